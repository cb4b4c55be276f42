//! Telemetry over HTTP against a real hub (its real telemetry service and engine): device
//! payload writes, series, raw pages, aggregates (equal to what the raw points imply, before and
//! after the head is sealed into parts with rollups), fleet snapshots and group-by aggregates,
//! settings and retention, the InfluxDB v2 write API, roles and tenant isolation.

use std::collections::BTreeMap;
use std::io::Write;

use crate::common::*;

const HOUR: i64 = 3_600_000;
const MIN: i64 = 60_000;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Raw HTTP to the hub (outside /api/v1, or with other auth schemes).
struct Http {
    client: reqwest::Client,
    root: String,
}

impl Http {
    fn new(hub: &TestHub) -> Http {
        Http {
            client: reqwest::Client::new(),
            root: format!("http://{}", hub.http),
        }
    }

    /// `POST /api/v2/write?query` with `Authorization: auth` and optional gzip; (status, body).
    async fn write(
        &self,
        auth: Option<&str>,
        query: &str,
        body: Vec<u8>,
        encoding: Option<&str>,
    ) -> (u16, Value) {
        let mut req = self
            .client
            .post(format!("{}/api/v2/write?{query}", self.root))
            .body(body);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        if let Some(e) = encoding {
            req = req.header("content-encoding", e);
        }
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        let bytes = res.bytes().await.unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        (status, body)
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Percent-encodes a path segment.
fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Every point of a series in `[from, to)`, following the cursors with pages of `limit`.
async fn all_points(
    api: &Api,
    base: &str,
    from: i64,
    to: i64,
    limit: usize,
    desc: bool,
) -> Vec<(i64, Value)> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10_000 {
        let mut q = format!("{base}?from={from}&to={to}&limit={limit}");
        if desc {
            q.push_str("&order=desc");
        }
        if let Some(c) = &cursor {
            q.push_str(&format!("&cursor={c}"));
        }
        let page = api.get(&q).await.expect(200);
        let points = page["points"].as_array().unwrap();
        assert!(points.len() <= limit);
        for p in points {
            let ts = p["ts"].as_i64().unwrap();
            assert!(p["time"].as_str().unwrap().ends_with('Z'));
            out.push((ts, p["value"].clone()));
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return out,
        }
    }
    panic!("pagination does not end");
}

/// What a bucketed aggregate of `points` must be: start → (count, sum, min, max, first, last).
fn expected_buckets(points: &[(i64, f64)], bucket: i64) -> BTreeMap<i64, [f64; 6]> {
    let mut out: BTreeMap<i64, [f64; 6]> = BTreeMap::new();
    let mut sorted = points.to_vec();
    sorted.sort_by_key(|p| p.0);
    for (ts, v) in sorted {
        let b = ts.div_euclid(bucket) * bucket;
        let e = out
            .entry(b)
            .or_insert([0.0, 0.0, f64::INFINITY, f64::NEG_INFINITY, v, v]);
        e[0] += 1.0;
        e[1] += v;
        e[2] = e[2].min(v);
        e[3] = e[3].max(v);
        e[5] = v;
    }
    out
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * (1.0 + a.abs().max(b.abs()))
}

/// Checks an aggregate's buckets (all functions) against the raw points.
#[track_caller]
fn check_buckets(buckets: &Value, points: &[(i64, f64)], bucket: i64) {
    let want = expected_buckets(points, bucket);
    let got = buckets.as_array().unwrap();
    assert_eq!(got.len(), want.len(), "{buckets}");
    for (b, (start, w)) in got.iter().zip(&want) {
        assert_eq!(b["start"].as_i64().unwrap(), *start, "{b}");
        assert_eq!(b["count"].as_f64().unwrap(), w[0], "{b}");
        assert!(close(b["sum"].as_f64().unwrap(), w[1]), "{b} {w:?}");
        assert!(close(b["min"].as_f64().unwrap(), w[2]), "{b} {w:?}");
        assert!(close(b["max"].as_f64().unwrap(), w[3]), "{b} {w:?}");
        assert!(close(b["first"].as_f64().unwrap(), w[4]), "{b} {w:?}");
        assert!(close(b["last"].as_f64().unwrap(), w[5]), "{b} {w:?}");
        assert!(close(b["avg"].as_f64().unwrap(), w[1] / w[0]), "{b} {w:?}");
    }
}

async fn flush(hub: &TestHub) {
    hub.hub()
        .telemetry
        .as_ref()
        .expect("telemetry is enabled in test hubs")
        .engine()
        .flush()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_writes_series_raw_pages_and_aggregates() {
    bounded(120, async {
        let hub = TestHub::start().await.unwrap();
        let admin = Api::admin(&hub);
        admin.tenant("tm").await;
        admin.tenant("other").await;
        admin.device("tm", json!({"id": "d1"})).await;
        admin.device("other", json!({"id": "d1"})).await;
        let operator = admin.with_token(Some(&admin.token("operator", Some("tm")).await));
        let viewer = admin.with_token(Some(&admin.token("viewer", Some("tm")).await));
        let outsider = admin.with_token(Some(&admin.token("admin", Some("other")).await));

        // 36 points, every 5 minutes from 3 hours ago (hour-aligned), as one batch payload.
        let t0 = (now_ms() / HOUR - 3) * HOUR;
        let points: Vec<(i64, f64)> = (0..36)
            .map(|i| (t0 + i * 5 * MIN, (i as f64) * 0.5 + (i % 3) as f64))
            .collect();
        let batch: Vec<Value> = points
            .iter()
            .map(|(t, v)| json!({"ts": t, "temp": v, "state": if *v > 5.0 { "hot" } else { "cold" }}))
            .collect();
        let path = "/tenants/tm/devices/d1/telemetry";
        let r = operator.post(path, json!(batch)).await.expect(200);
        assert_eq!(r, json!({"points": 72, "rejected": []}));
        // CBOR by Content-Type: {"hum": 40}.
        let cbor = vec![0xA1, 0x63, b'h', b'u', b'm', 0x18, 0x28];
        let r = operator
            .raw(Method::POST, path, Some("application/cbor"), cbor)
            .await
            .expect(200);
        assert_eq!(r["points"], 1);
        // A value of another kind is refused on its own; a bad payload writes nothing.
        let r = operator
            .post(path, json!({"temp": "warm", "extra": 1}))
            .await
            .expect(200);
        assert_eq!(r["points"], 1);
        assert_eq!(r["rejected"].as_array().unwrap().len(), 1, "{r}");
        operator
            .raw(Method::POST, path, Some("application/json"), b"{not json".to_vec())
            .await
            .expect_error(400, "invalid");
        // Roles, registry, isolation.
        viewer
            .post(path, json!({"temp": 1}))
            .await
            .expect_error(403, "forbidden");
        operator
            .post("/tenants/tm/devices/ghost/telemetry", json!({"temp": 1}))
            .await
            .expect_error(404, "not_found");
        let m = outsider
            .get("/tenants/tm/devices/d1/telemetry")
            .await
            .expect_error(404, "not_found");
        assert_eq!(m, "tenant tm not found");
        outsider
            .post(path, json!({"temp": 1}))
            .await
            .expect_error(404, "not_found");
        assert_eq!(
            admin
                .get("/tenants/other/devices/d1/telemetry")
                .await
                .expect(200),
            json!([])
        );

        // Series of the device.
        let series = viewer.get(path).await.expect(200);
        let metrics: Vec<&str> = series
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["metric"].as_str().unwrap())
            .collect();
        assert_eq!(metrics, vec!["extra", "hum", "state", "temp"], "{series}");
        let temp = &series[3];
        assert_eq!(temp["kind"], "numeric");
        assert_eq!(temp["latest_ts"], points[35].0);
        assert_eq!(temp["latest"], points[35].1);
        assert_eq!(series[2]["kind"], "string");

        // Raw pages: ascending and descending, every page size gives the same points.
        let (from, to) = (t0, t0 + 3 * HOUR);
        let base = format!("{path}/temp");
        let full = all_points(&viewer, &base, from, to, 100_000, false).await;
        assert_eq!(full.len(), 36);
        for (i, (ts, v)) in full.iter().enumerate() {
            assert_eq!(*ts, points[i].0);
            assert_eq!(v.as_f64().unwrap(), points[i].1);
        }
        for limit in [1, 5, 7, 36] {
            assert_eq!(
                all_points(&viewer, &base, from, to, limit, false).await,
                full
            );
            let mut desc = all_points(&viewer, &base, from, to, limit, true).await;
            desc.reverse();
            assert_eq!(desc, full);
        }
        let page = viewer
            .get(&format!("{base}?from={from}&to={to}&limit=10&order=desc"))
            .await
            .expect(200);
        assert_eq!(page["points"][0]["ts"], points[35].0);
        assert_eq!(
            page["next_cursor"].as_str().unwrap(),
            points[26].0.to_string()
        );
        // Default window: the last 24 hours; RFC 3339 and relative times.
        let page = viewer.get(&base).await.expect(200);
        assert_eq!(page["points"].as_array().unwrap().len(), 36);
        let page = viewer
            .get(&format!("{base}?from=-24h&to=now&limit=2"))
            .await
            .expect(200);
        assert_eq!(page["points"][0]["ts"], t0);
        let rfc = page["points"][1]["time"].as_str().unwrap().to_string();
        let page = viewer
            .get(&format!("{base}?from={rfc}&limit=1"))
            .await
            .expect(200);
        assert_eq!(page["points"][0]["ts"], t0 + 5 * MIN);
        let strings = viewer
            .get(&format!("{path}/state?from={from}&to={to}&limit=3"))
            .await
            .expect(200);
        assert_eq!(strings["points"][0]["value"], "cold");
        for bad in [
            "limit=0",
            "limit=100001",
            "order=up",
            "from=yesterday",
            "cursor=abc",
            "colour=red",
            "from=now&to=-1h",
        ] {
            viewer
                .get(&format!("{base}?{bad}"))
                .await
                .expect_error(400, "invalid");
        }
        // An unknown series has no points.
        let empty = viewer
            .get(&format!("{path}/nothing?from={from}&to={to}"))
            .await
            .expect(200);
        assert_eq!(empty, json!({"points": [], "next_cursor": null}));

        // Metric names with dots and braces (from line protocol), percent-encoded in the path.
        let http = Http::new(&hub);
        let secret = admin.token("operator", Some("tm")).await;
        let (status, body) = http
            .write(
                Some(&format!("Token {secret}")),
                "org=tm&bucket=b&precision=ms",
                format!("cpu,device=d1,cpu=cpu0 usage=1.5 {t0}\n").into_bytes(),
                None,
            )
            .await;
        assert_eq!(status, 204, "{body}");
        let name = "cpu.usage{cpu=cpu0}";
        let page = viewer
            .get(&format!("{path}/{}?from={from}&to={to}", enc(name)))
            .await
            .expect(200);
        assert_eq!(page["points"], json!([{"ts": t0, "time": page["points"][0]["time"], "value": 1.5}]));

        // Aggregates equal what the raw points imply, from the head and then from parts with
        // rollups (hourly and minute), for several bucket widths.
        for sealed in [false, true] {
            if sealed {
                flush(&hub).await;
            }
            for (bucket, width) in [("1h", HOUR), ("30m", 30 * MIN), ("7m", 7 * MIN), ("1d", 24 * HOUR)] {
                for (a, b) in [(from, to), (from + 13 * MIN, to - 22 * MIN)] {
                    let agg = viewer
                        .get(&format!("{base}/aggregate?from={a}&to={b}&bucket={bucket}"))
                        .await
                        .expect(200);
                    assert_eq!(agg["bucket_ms"], width);
                    let inside: Vec<(i64, f64)> = points
                        .iter()
                        .copied()
                        .filter(|(t, _)| *t >= a && *t < b)
                        .collect();
                    check_buckets(&agg["buckets"], &inside, width);
                }
            }
        }
        // Only the requested functions.
        let agg = viewer
            .get(&format!("{base}/aggregate?from={from}&to={to}&bucket=1h&fn=max,count"))
            .await
            .expect(200);
        let keys: Vec<&String> = agg["buckets"][0].as_object().unwrap().keys().collect();
        assert_eq!(keys, vec!["count", "max", "start", "time"]);
        assert_eq!(agg["buckets"][0]["count"], 12);
        for bad in [
            "bucket=soon",
            "fn=median",
            "from=-1h",
            "bucket=1ms&from=-30d",
            "bucket=1h&colour=red",
        ] {
            viewer
                .get(&format!("{base}/aggregate?{bad}"))
                .await
                .expect_error(400, "invalid");
        }
        let m = viewer
            .get(&format!("{path}/state/aggregate?bucket=1h"))
            .await
            .expect_error(400, "invalid");
        assert!(m.contains("strings"), "{m}");
        hub.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_latest_and_group_by() {
    bounded(120, async {
        let hub = TestHub::start().await.unwrap();
        let admin = Api::admin(&hub);
        admin.tenant("fl").await;
        admin.put("/tenants/fl/groups/wave", json!({})).await.expect(200);
        admin
            .put("/tenants/fl/device-types/probe", json!({}))
            .await
            .expect(200);
        admin
            .put(
                "/tenants/fl/groups/north",
                json!({"query": {"tags": {"region": "north"}}}),
            )
            .await
            .expect(200);
        let specs = [
            ("d1", json!({"site": "a", "region": "north"}), true),
            ("d2", json!({"site": "a"}), false),
            ("d3", json!({"site": "b", "region": "north"}), true),
            ("d4", json!({}), false),
            ("d5", json!({"site": "b"}), true),
        ];
        for (id, tags, wave) in &specs {
            let groups = if *wave { json!(["wave"]) } else { json!([]) };
            admin
                .device("fl", json!({"id": id, "tags": tags, "type": "probe", "groups": groups}))
                .await;
        }
        let viewer = admin.with_token(Some(&admin.token("viewer", Some("fl")).await));
        // d1..d4 report temp (d5 never does); "host9" is no registry device (line protocol).
        let t0 = (now_ms() / HOUR - 2) * HOUR;
        let mut data: BTreeMap<&str, Vec<(i64, f64)>> = BTreeMap::new();
        for (n, d) in ["d1", "d2", "d3", "d4"].into_iter().enumerate() {
            let pts: Vec<(i64, f64)> = (0..12)
                // Distinct timestamps across devices, so that first and last are defined.
                .map(|i| (t0 + i * 10 * MIN + n as i64 * 1000, (n * 100 + i as usize) as f64))
                .collect();
            let batch: Vec<Value> = pts.iter().map(|(t, v)| json!({"ts": t, "temp": v})).collect();
            admin
                .post(&format!("/tenants/fl/devices/{d}/telemetry"), json!(batch))
                .await
                .expect(200);
            data.insert(d, pts);
        }
        let host: Vec<(i64, f64)> = (0..12).map(|i| (t0 + i * 10 * MIN, 1000.0 + i as f64)).collect();
        let lines: String = host
            .iter()
            .map(|(t, v)| format!("temp,host=host9 value={v} {t}\n"))
            .collect();
        let (status, body) = Http::new(&hub)
            .write(
                Some(&format!("Bearer {TEST_ADMIN_TOKEN}")),
                "org=fl&precision=ms",
                lines.into_bytes(),
                None,
            )
            .await;
        assert_eq!(status, 204, "{body}");
        // The line-protocol metric is `temp.value`, of host9 only.
        data.insert("host9", host.clone());

        let latest = |q: &str| {
            let v = viewer.clone();
            let q = q.to_string();
            async move {
                v.get(&format!("/tenants/fl/telemetry/latest?{q}"))
                    .await
                    .expect(200)
            }
        };
        let devices = |page: &Value| -> Vec<String> {
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x["device"].as_str().unwrap().to_string())
                .collect()
        };
        // No selection: every device that has the metric.
        let all = latest("metric=temp").await;
        assert_eq!(devices(&all), vec!["d1", "d2", "d3", "d4"]);
        assert_eq!(all["items"][1]["value"], 111.0);
        assert_eq!(all["items"][1]["ts"], t0 + 110 * MIN + 1000);
        assert!(all["next_cursor"].is_null());
        let lp = latest("metric=temp.value").await;
        assert_eq!(devices(&lp), vec!["host9"]);
        assert_eq!(lp["items"][0]["value"], 1011.0);
        // By tag, group (static and dynamic), type, device list; devices without data show null.
        assert_eq!(devices(&latest("metric=temp&tag=site:a").await), vec!["d1", "d2"]);
        assert_eq!(
            devices(&latest("metric=temp&tag=site:b&tag=region:north").await),
            vec!["d3"]
        );
        let wave = latest("metric=temp&group=wave").await;
        assert_eq!(devices(&wave), vec!["d1", "d3", "d5"]);
        assert!(wave["items"][2]["value"].is_null() && wave["items"][2]["ts"].is_null());
        assert_eq!(devices(&latest("metric=temp&group=north").await), vec!["d1", "d3"]);
        assert_eq!(devices(&latest("metric=temp&type=probe").await).len(), 5);
        assert_eq!(
            devices(&latest("metric=temp&devices=d4,d2,nobody").await),
            vec!["d2", "d4", "nobody"]
        );
        assert_eq!(
            devices(&latest("metric=temp&group=wave&devices=d1,d2").await),
            vec!["d1"]
        );
        // Pages.
        let p1 = latest("metric=temp&type=probe&limit=2").await;
        assert_eq!(devices(&p1), vec!["d1", "d2"]);
        assert_eq!(p1["next_cursor"], "d2");
        let p2 = latest("metric=temp&type=probe&limit=2&cursor=d2").await;
        assert_eq!(devices(&p2), vec!["d3", "d4"]);
        let p3 = latest("metric=temp&type=probe&limit=2&cursor=d4").await;
        assert_eq!(devices(&p3), vec!["d5"]);
        assert!(p3["next_cursor"].is_null());
        for bad in ["", "metric=temp&limit=0", "metric=temp&limit=10001", "metric=temp&tag=x", "metric=temp&colour=red"] {
            viewer
                .get(&format!("/tenants/fl/telemetry/latest?{bad}"))
                .await
                .expect_error(400, "invalid");
        }
        viewer
            .get("/tenants/fl/telemetry/latest?metric=temp&group=nope")
            .await
            .expect_error(404, "not_found");

        // Fleet aggregates: all, by device, by tag (devices without the tag: group null).
        let (from, to) = (t0, t0 + 2 * HOUR);
        let agg = |q: String| {
            let v = viewer.clone();
            async move {
                v.get(&format!(
                    "/tenants/fl/telemetry/aggregate?metric=temp&from={from}&to={to}&{q}"
                ))
                .await
                .expect(200)
            }
        };
        let merged = |ds: &[&str]| -> Vec<(i64, f64)> {
            ds.iter().flat_map(|d| data[d].iter().copied()).collect()
        };
        for sealed in [false, true] {
            if sealed {
                flush(&hub).await;
            }
            let a = agg("bucket=1h".into()).await;
            assert_eq!(a["groups"].as_array().unwrap().len(), 1);
            assert_eq!(a["groups"][0]["group"], "all");
            assert_eq!(a["groups"][0]["series"], 4);
            check_buckets(&a["groups"][0]["buckets"], &merged(&["d1", "d2", "d3", "d4"]), HOUR);

            let by_dev = agg("bucket=30m&by=device&group=wave".into()).await;
            let groups = by_dev["groups"].as_array().unwrap();
            assert_eq!(groups.len(), 2, "{by_dev}"); // d5 has no data
            for (g, d) in groups.iter().zip(["d1", "d3"]) {
                assert_eq!(g["group"], d);
                assert_eq!(g["series"], 1);
                check_buckets(&g["buckets"], &data[d], 30 * MIN);
            }

            let by_site = agg("bucket=1h&by=tag:site".into()).await;
            let groups = by_site["groups"].as_array().unwrap();
            let labels: Vec<&Value> = groups.iter().map(|g| &g["group"]).collect();
            assert_eq!(labels, vec![&Value::Null, &json!("a"), &json!("b")], "{by_site}");
            check_buckets(&groups[0]["buckets"], &merged(&["d4"]), HOUR);
            check_buckets(&groups[1]["buckets"], &merged(&["d1", "d2"]), HOUR);
            check_buckets(&groups[2]["buckets"], &merged(&["d3"]), HOUR);

            let by_region = agg("bucket=1h&by=tag:region&tag=site:a&fn=sum".into()).await;
            let groups = by_region["groups"].as_array().unwrap();
            assert_eq!(groups.len(), 2);
            assert!(groups[0]["group"].is_null());
            assert_eq!(groups[1]["group"], "north");
            assert_eq!(groups[1]["series"], 1);
            let sum: f64 = data["d1"].iter().filter(|(t, _)| *t < t0 + HOUR).map(|p| p.1).sum();
            assert_eq!(groups[1]["buckets"][0]["sum"].as_f64().unwrap(), sum);
            assert!(groups[1]["buckets"][0].get("avg").is_none());

            // A device that is not in the registry, by explicit list; by tag it has none.
            let lp = viewer
                .get(&format!(
                    "/tenants/fl/telemetry/aggregate?metric=temp.value&from={from}&to={to}&bucket=1h&by=tag:site"
                ))
                .await
                .expect(200);
            assert_eq!(lp["groups"].as_array().unwrap().len(), 1);
            assert!(lp["groups"][0]["group"].is_null());
            check_buckets(&lp["groups"][0]["buckets"], &data["host9"], HOUR);
        }
        for bad in [
            "metric=temp",
            "metric=temp&bucket=1h&by=colour",
            "metric=temp&bucket=1h&by=tag:",
            "metric=temp&bucket=1h&fn=median",
            "metric=temp&bucket=1ms&from=-30d&by=device",
            "metric=temp&bucket=1h&limit=5",
        ] {
            viewer
                .get(&format!("/tenants/fl/telemetry/aggregate?{bad}"))
                .await
                .expect_error(400, "invalid");
        }
        hub.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn influxdb_v2_write_api() {
    bounded(120, async {
        let hub = TestHub::start().await.unwrap();
        let admin = Api::admin(&hub);
        admin.tenant("ix").await;
        admin.tenant("iy").await;
        let op = admin.token("operator", Some("ix")).await;
        let viewer = admin.token("viewer", Some("ix")).await;
        let http = Http::new(&hub);
        let token = format!("Token {op}");
        let t0 = (now_ms() / HOUR - 1) * HOUR;
        let read = |device: &str, metric: &str| {
            let path = format!(
                "/tenants/ix/devices/{device}/telemetry/{}?from={}&to={}",
                enc(metric),
                t0 - HOUR,
                t0 + 2 * HOUR
            );
            let a = admin.clone();
            async move { a.get(&path).await.expect(200)["points"].clone() }
        };

        // Each precision, the Token and the Bearer scheme; `bucket` is ignored.
        for (i, (precision, scale)) in [("ns", 1_000_000i64), ("us", 1_000), ("ms", 1), ("s", 0)]
            .into_iter()
            .enumerate()
        {
            let ts_ms = t0 + i as i64 * 1000;
            let stamp = if scale == 0 {
                ts_ms / 1000
            } else {
                ts_ms * scale
            };
            let auth = if i % 2 == 0 {
                token.clone()
            } else {
                format!("Bearer {op}")
            };
            let line = format!("m,device=lp{i} f={i}i,ok=true,s=\"x y\" {stamp}\n");
            let (status, body) = http
                .write(
                    Some(&auth),
                    &format!("org=ix&bucket=ignored&precision={precision}"),
                    line.into_bytes(),
                    None,
                )
                .await;
            assert_eq!(status, 204, "{precision}: {body}");
            let pts = read(&format!("lp{i}"), "m.f").await;
            assert_eq!(pts.as_array().unwrap().len(), 1, "{precision}: {pts}");
            assert_eq!(pts[0]["ts"], ts_ms, "{precision}");
            assert_eq!(pts[0]["value"], i);
            assert_eq!(read(&format!("lp{i}"), "m.ok").await[0]["value"], true);
            assert_eq!(read(&format!("lp{i}"), "m.s").await[0]["value"], "x y");
        }
        // Default precision: nanoseconds. No org with a tenant-scoped token: its tenant.
        let (status, _) = http
            .write(
                Some(&token),
                "",
                format!("m,host=h1 v=2.5 {}\n", t0 * 1_000_000).into_bytes(),
                None,
            )
            .await;
        assert_eq!(status, 204);
        assert_eq!(read("h1", "m.v").await[0]["ts"], t0);
        // gzip, several lines, tags kept in the metric name.
        let body: String = (0..100)
            .map(|i| format!("cpu,host=web1,cpu=cpu{} usage={}.5 {}\n", i % 2, i, t0 + i))
            .collect();
        let (status, b) = http
            .write(
                Some(&token),
                "org=ix&precision=ms",
                gzip(body.as_bytes()),
                Some("gzip"),
            )
            .await;
        assert_eq!(status, 204, "{b}");
        assert_eq!(
            read("web1", "cpu.usage{cpu=cpu0}")
                .await
                .as_array()
                .unwrap()
                .len(),
            50
        );
        assert_eq!(read("web1", "cpu.usage{cpu=cpu1}").await[0]["value"], 1.5);

        // A bad line rejects the whole request, in InfluxDB's error shape; nothing is written.
        let (status, body) = http
            .write(
                Some(&token),
                "org=ix&precision=ms",
                format!("good,device=z1 v=1 {t0}\nbad,device=z1 v= {t0}\n").into_bytes(),
                None,
            )
            .await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["code"], "invalid");
        let msg = body["message"].as_str().unwrap();
        assert!(
            msg.starts_with("unable to parse 'bad,device=z1 v= "),
            "{msg}"
        );
        assert_eq!(body.as_object().unwrap().len(), 2, "{body}");
        assert_eq!(read("z1", "good.v").await, json!([]));
        // A point without a device tag, a gzip body that is not gzip, an unknown precision, an
        // encoding we do not take.
        for (query, line, encoding, want) in [
            ("org=ix", "m v=1\n", None, (400, "invalid")),
            ("org=ix", "m,device=a v=1\n", Some("gzip"), (400, "invalid")),
            (
                "org=ix&precision=h",
                "m,device=a v=1\n",
                None,
                (400, "invalid"),
            ),
            (
                "org=ix",
                "m,device=a v=1\n",
                Some("br"),
                (415, "unsupported media type"),
            ),
        ] {
            let (status, body) = http
                .write(Some(&token), query, line.as_bytes().to_vec(), encoding)
                .await;
            assert_eq!(
                (status, body["code"].as_str()),
                (want.0, Some(want.1)),
                "{query} {encoding:?}: {body}"
            );
        }
        // A field of another kind than its series: partial write (422), the rest stored.
        let (status, body) = http
            .write(
                Some(&token),
                "org=ix&precision=ms",
                format!(
                    "k,device=kc v=1 {t0}\nk,device=kc v=\"str\",w=2 {}\n",
                    t0 + 1
                )
                .into_bytes(),
                None,
            )
            .await;
        assert_eq!(status, 422, "{body}");
        assert_eq!(body["code"], "unprocessable entity");
        assert!(
            body["message"].as_str().unwrap().contains("partial write"),
            "{body}"
        );
        assert_eq!(read("kc", "k.w").await[0]["value"], 2.0);
        // Decompressed bodies are bounded.
        let bomb = gzip(&vec![b'#'; 33 * 1024 * 1024]);
        let (status, body) = http.write(Some(&token), "org=ix", bomb, Some("gzip")).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (413, Some("request too large")),
            "{body}"
        );

        // Authentication, roles and tenants.
        let (status, body) = http
            .write(None, "org=ix", b"m,device=a v=1".to_vec(), None)
            .await;
        assert_eq!(
            (status, body["code"].as_str()),
            (401, Some("unauthorized")),
            "{body}"
        );
        let (status, body) = http
            .write(
                Some("Token fh_wrong_0000000000000000"),
                "org=ix",
                b"m,device=a v=1".to_vec(),
                None,
            )
            .await;
        assert_eq!(
            (status, body["code"].as_str()),
            (401, Some("unauthorized")),
            "{body}"
        );
        let (status, body) = http
            .write(
                Some(&format!("Token {viewer}")),
                "org=ix",
                b"m,device=a v=1".to_vec(),
                None,
            )
            .await;
        assert_eq!(
            (status, body["code"].as_str()),
            (403, Some("forbidden")),
            "{body}"
        );
        let (status, body) = http
            .write(Some(&token), "org=iy", b"m,device=a v=1".to_vec(), None)
            .await;
        assert_eq!(
            (status, body["code"].as_str()),
            (404, Some("not found")),
            "{body}"
        );
        assert_eq!(body["message"], "tenant iy not found");
        let admin_token = format!("Token {TEST_ADMIN_TOKEN}");
        let (status, body) = http
            .write(Some(&admin_token), "", b"m,device=a v=1".to_vec(), None)
            .await;
        assert_eq!(
            (status, body["code"].as_str()),
            (400, Some("invalid")),
            "{body}"
        );
        assert!(body["message"].as_str().unwrap().contains("org"), "{body}");
        let (status, _) = http
            .write(
                Some(&admin_token),
                "org=nope",
                b"m,device=a v=1".to_vec(),
                None,
            )
            .await;
        assert_eq!(status, 404);
        // A platform-wide token writes to the org it names (orgID as a synonym), and only there.
        let (status, _) = http
            .write(
                Some(&admin_token),
                "orgID=iy&precision=ms",
                format!("m,device=a v=7 {t0}").into_bytes(),
                None,
            )
            .await;
        assert_eq!(status, 204);
        let y = admin
            .get(&format!(
                "/tenants/iy/devices/a/telemetry/m.v?from={}&to={}",
                t0,
                t0 + 1
            ))
            .await
            .expect(200);
        assert_eq!(y["points"][0]["value"], 7.0);
        assert_eq!(read("a", "m.v").await, json!([]));
        // The Token scheme works on the operator API too.
        let res = reqwest::Client::new()
            .get(format!("{}/tenants/ix", hub.api_url()))
            .header("authorization", &token)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        hub.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_and_retention() {
    bounded(120, async {
        let hub = TestHub::start().await.unwrap();
        let admin = Api::admin(&hub);
        admin.tenant("st").await;
        let tenant_admin = admin.with_token(Some(&admin.token("admin", Some("st")).await));
        let operator = admin.with_token(Some(&admin.token("operator", Some("st")).await));
        let viewer = admin.with_token(Some(&admin.token("viewer", Some("st")).await));
        let path = "/tenants/st/telemetry/settings";

        let defaults = viewer.get(path).await.expect(200);
        assert_eq!(
            defaults,
            json!({"retention_days": null, "keep_forever": false, "topics": null, "format": null,
                   "effective": {"retention_days": 30, "keep_forever": false,
                                 "topics": ["devices/+/telemetry/#"], "format": "auto"}})
        );
        operator
            .put(path, json!({"retention_days": 7}))
            .await
            .expect_error(403, "forbidden");
        let set = tenant_admin
            .put(
                path,
                json!({"retention_days": 7, "topics": ["plant/+/data/#"], "format": "msgpack"}),
            )
            .await
            .expect(200);
        assert_eq!(set["retention_days"], 7);
        assert_eq!(set["effective"]["retention_days"], 7);
        assert_eq!(set["effective"]["topics"], json!(["plant/+/data/#"]));
        assert_eq!(set["format"], "msgpack");
        assert_eq!(viewer.get(path).await.expect(200), set);
        // A GET body goes back unchanged.
        assert_eq!(tenant_admin.put(path, set.clone()).await.expect(200), set);
        // Forever; then PUT replaces everything: absent fields take the hub's defaults.
        let forever = tenant_admin
            .put(path, json!({"keep_forever": true}))
            .await
            .expect(200);
        assert_eq!(forever["keep_forever"], true);
        assert!(forever["retention_days"].is_null());
        assert!(forever["effective"]["retention_days"].is_null());
        assert_eq!(forever["effective"]["keep_forever"], true);
        assert!(forever["topics"].is_null());
        assert_eq!(forever["effective"]["format"], "auto");
        assert_eq!(
            tenant_admin.put(path, json!({})).await.expect(200),
            defaults
        );
        for bad in [
            json!({"retention_days": 0}),
            json!({"retention_days": 40000}),
            json!({"retention_days": 5, "keep_forever": true}),
            json!({"topics": ["$SYS/#"]}),
            json!({"topics": ["a/#/b"]}),
            json!({"format": "xml"}),
            json!({"colour": "red"}),
        ] {
            tenant_admin
                .put(path, bad.clone())
                .await
                .expect_error(400, "invalid");
        }
        assert_eq!(viewer.get(path).await.expect(200), defaults);

        // Retention: ten-day-old points, sealed into a part, expire under a 3-day retention.
        let old = now_ms() - 10 * 24 * HOUR;
        let recent = now_ms() - HOUR;
        let lines = format!("t,device=r1 v=1 {old}\nt,device=r1 v=2 {recent}\n");
        let (status, body) = Http::new(&hub)
            .write(
                Some(&format!("Token {TEST_ADMIN_TOKEN}")),
                "org=st&precision=ms",
                lines.into_bytes(),
                None,
            )
            .await;
        assert_eq!(status, 204, "{body}");
        flush(&hub).await;
        let raw = "/tenants/st/devices/r1/telemetry/t.v?from=-30d&to=now";
        assert_eq!(
            viewer.get(raw).await.expect(200)["points"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
        operator
            .post("/tenants/st/telemetry/retention/apply", json!(null))
            .await
            .expect_error(403, "forbidden");
        tenant_admin
            .put(path, json!({"retention_days": 3}))
            .await
            .expect(200);
        let applied = admin
            .post("/tenants/st/telemetry/retention/apply", json!(null))
            .await
            .expect(200);
        assert_eq!(applied["retention_days"], 3);
        assert!(applied["partitions_deleted"].is_u64(), "{applied}");
        assert!(applied["bytes_freed"].is_u64(), "{applied}");
        // This pass freed the day, unless the hub's own maintenance pass (every minute) came first.
        let stats_freed = hub
            .hub()
            .telemetry
            .as_ref()
            .unwrap()
            .engine()
            .stats()
            .retention_bytes_freed
            .load(std::sync::atomic::Ordering::Relaxed);
        assert!(stats_freed > 0, "{applied}");
        assert!(
            applied["bytes_freed"].as_u64().unwrap() == stats_freed || applied["bytes_freed"] == 0,
            "{applied}"
        );
        assert!(
            applied["kept_from"]
                .as_str()
                .unwrap()
                .ends_with("T00:00:00.000Z")
        );
        let left = viewer.get(raw).await.expect(200);
        assert_eq!(left["points"].as_array().unwrap().len(), 1, "{left}");
        assert_eq!(left["points"][0]["value"], 2.0);
        // A tenant-scoped admin sees its retention, not the hub-wide counts.
        let applied = tenant_admin
            .post("/tenants/st/telemetry/retention/apply", json!(null))
            .await
            .expect(200);
        assert!(applied["partitions_deleted"].is_null() && applied["bytes_freed"].is_null());
        hub.stop().await;

        // A hub without telemetry answers its routes 503.
        let hub = TestHub::start_with(|c| c.telemetry.enabled = false)
            .await
            .unwrap();
        let admin = Api::admin(&hub);
        let m = admin
            .get("/tenants/default/telemetry/settings")
            .await
            .expect_error(503, "unavailable");
        assert!(m.contains("[telemetry]"), "{m}");
        let (status, body) = Http::new(&hub)
            .write(
                Some(&format!("Token {TEST_ADMIN_TOKEN}")),
                "org=default",
                b"m,device=a v=1".to_vec(),
                None,
            )
            .await;
        assert_eq!((status, body["code"].as_str()), (503, Some("unavailable")));
        hub.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_jobs_write_csv_in_the_export_folder_with_progress() {
    bounded(120, async {
        let hub = TestHub::start().await.unwrap();
        let admin = Api::admin(&hub);
        admin.tenant("ex").await;
        admin.device("ex", json!({"id": "d1"})).await;
        let operator = admin.with_token(Some(&admin.token("operator", Some("ex")).await));
        let viewer = admin.with_token(Some(&admin.token("viewer", Some("ex")).await));
        let t0 = (now_ms() / HOUR - 2) * HOUR;
        let batch: Vec<Value> = (0..500)
            .map(|i| json!({"ts": t0 + i * 1000, "v": i}))
            .collect();
        operator
            .post("/tenants/ex/devices/d1/telemetry", json!(batch))
            .await
            .expect(200);
        let body =
            json!({"destination": "run1", "format": "csv", "from": t0, "to": t0 + 3_600_000});
        viewer
            .post("/tenants/ex/telemetry/exports", body.clone())
            .await
            .expect_error(403, "forbidden");
        let bad = json!({"destination": "../../etc", "from": t0, "to": t0 + 1});
        operator
            .post("/tenants/ex/telemetry/exports", bad)
            .await
            .expect(400);
        let job = operator
            .post("/tenants/ex/telemetry/exports", body)
            .await
            .expect(202);
        let id = job["id"].as_u64().unwrap();
        let done = wait_for(
            &viewer,
            &format!("/tenants/ex/telemetry/exports/{id}"),
            |j| j["state"] != "running",
        )
        .await;
        assert_eq!(done["state"], "succeeded", "{done}");
        assert_eq!(done["rows"], 500);
        let file = done["files"][0].as_str().unwrap();
        let text = std::fs::read_to_string(file).unwrap();
        assert_eq!(text.lines().count(), 501);
        assert!(text.starts_with("tenant,device,metric,ts,value,type"));
        let list = viewer
            .get("/tenants/ex/telemetry/exports")
            .await
            .expect(200);
        assert_eq!(list.as_array().unwrap().len(), 1);
        viewer
            .get("/tenants/ex/telemetry/exports/999")
            .await
            .expect(404);
        hub.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_times_take_the_forms_of_the_query_routes() {
    bounded(120, async {
        let hub = TestHub::start().await.unwrap();
        let admin = Api::admin(&hub);
        admin.tenant("ext").await;
        admin.device("ext", json!({"id": "d1"})).await;
        let t0 = (now_ms() / HOUR - 2) * HOUR;
        let batch: Vec<Value> = (0..100)
            .map(|i| json!({"ts": t0 + i * 1000, "v": i}))
            .collect();
        admin
            .post("/tenants/ext/devices/d1/telemetry", json!(batch))
            .await
            .expect(200);
        let rfc = |ms: i64| {
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms as u64);
            humantime::format_rfc3339_millis(t).to_string()
        };
        let rows = |body: Value| {
            let admin = admin.clone();
            async move {
                let job = admin
                    .post("/tenants/ext/telemetry/exports", body)
                    .await
                    .expect(202);
                let path = format!("/tenants/ext/telemetry/exports/{}", job["id"]);
                let done = wait_for(&admin, &path, |j| j["state"] != "running").await;
                assert_eq!(done["state"], "succeeded", "{done}");
                done["rows"].as_u64().unwrap()
            }
        };
        // RFC 3339, relative times and `now`; `to` absent or null is now; numbers stay ms.
        for (from, to) in [
            (json!(rfc(t0)), None),
            (json!("-3h"), Some(json!("now"))),
            (json!(t0), Some(json!(rfc(t0 + 50_000)))),
            (json!(t0.to_string()), Some(json!(t0 + 50_000))),
            (json!(" -3h "), Some(Value::Null)),
        ] {
            let mut body = json!({"destination": "times", "format": "csv", "from": from});
            if let Some(to) = &to {
                body["to"] = to.clone();
            }
            let want = if to.as_ref().is_some_and(|t| !t.is_null() && *t != "now") {
                50
            } else {
                100
            };
            assert_eq!(rows(body.clone()).await, want, "{body}");
        }
        // A bad value is a 400 naming its field, and starts nothing.
        for (body, field) in [
            (json!({"from": "yesterday"}), "from"),
            (json!({"from": t0, "to": "soon"}), "to"),
            (json!({"from": true}), "from"),
            (json!({"from": 1.5}), "from"),
            (json!({"from": t0, "to": [1]}), "to"),
            (json!({"from": null}), "from"),
            (json!({"from": "-1h", "to": "-2h"}), "from"),
            (json!({"from": "now"}), "from"),
            (json!({}), "from"),
        ] {
            let mut body = body;
            body["destination"] = json!("times");
            let message = admin
                .post("/tenants/ext/telemetry/exports", body.clone())
                .await
                .expect_error(400, "invalid");
            assert!(message.contains(field), "{body}: {message}");
        }
        let jobs = admin
            .get("/tenants/ext/telemetry/exports")
            .await
            .expect(200);
        assert_eq!(jobs.as_array().unwrap().len(), 5);

        // The OpenAPI document says what the fields take.
        let doc = admin.get("/openapi.json").await.expect(200);
        let schema = &doc["components"]["schemas"]["ExportRequest"];
        for field in ["from", "to"] {
            let f = schema["properties"][field].to_string();
            assert!(f.contains("#/components/schemas/TimeSpec"), "{field}: {f}");
        }
        let required: Vec<&str> = schema["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(
            required.contains(&"from") && !required.contains(&"to"),
            "{schema}"
        );
        let time = doc["components"]["schemas"]["TimeSpec"].to_string();
        assert!(
            time.contains("integer") && time.contains("string"),
            "{time}"
        );
        hub.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_ids_that_break_the_id_rule_are_refused() {
    bounded(120, async {
        let hub = TestHub::start().await.unwrap();
        let admin = Api::admin(&hub);
        admin.tenant("ids").await;
        admin.device("ids", json!({"id": "reg-1"})).await;
        let op = admin.token("operator", Some("ids")).await;
        let http = Http::new(&hub);
        let t0 = (now_ms() / HOUR - 1) * HOUR;
        let series = |device: &str| {
            let path = format!("/tenants/ids/devices/{}/telemetry", enc(device));
            let a = admin.clone();
            async move { a.get(&path).await.expect(200) }
        };
        let rule = ferrohub_types::id::ID_RULE;

        // Line protocol: points whose device tag is not a valid id are dropped, the others
        // written; 422 names the lines and the rule, as InfluxDB answers a partial write.
        let body = format!(
            "m,device=ok-1 v=1 {t0}\n\
             m,device=a/b v=1,w=2 {t0}\n\
             # a comment\n\
             m,host=x#y v=1 {t0}\n\
             m,host=web1.example.com v=3 {t0}\n\
             m,device=a\\ b v=1 {t0}\n\
             m,device={} v=1 {t0}\n",
            "d".repeat(129)
        );
        let (status, reply) = http
            .write(
                Some(&format!("Token {op}")),
                "org=ids&precision=ms",
                body.into_bytes(),
                None,
            )
            .await;
        assert_eq!(status, 422, "{reply}");
        assert_eq!(reply["code"], "unprocessable entity");
        let msg = reply["message"].as_str().unwrap();
        assert!(
            msg.starts_with("partial write: line 2: device id \"a/b\" (tag `device`) is not valid"),
            "{msg}"
        );
        assert!(
            msg.contains("line 4: device id \"x#y\" (tag `host`)"),
            "{msg}"
        );
        assert!(msg.contains("line 6: device id \"a b\""), "{msg}");
        assert!(msg.contains(rule), "{msg}");
        assert!(msg.contains("(points stored: 2; dropped=5)"), "{msg}");
        assert!(!msg.contains("kind"), "{msg}");
        assert_eq!(series("ok-1").await[0]["metric"], "m.v");
        assert_eq!(series("web1.example.com").await[0]["latest"], 3.0);
        for bad in ["a/b", "x#y", "a b"] {
            assert_eq!(series(bad).await, json!([]), "{bad}");
        }
        // Only bad points: nothing stored, still a partial write.
        let (status, reply) = http
            .write(
                Some(&format!("Token {op}")),
                "org=ids&precision=ms",
                format!("m,host=$SYS v=1 {t0}\n").into_bytes(),
                None,
            )
            .await;
        assert_eq!(status, 422, "{reply}");
        let msg = reply["message"].as_str().unwrap();
        assert!(msg.contains("line 1: device id \"$SYS\""), "{msg}");
        assert!(msg.contains("(points stored: 0; dropped=1)"), "{msg}");

        // The device route: an id that breaks the rule is 400 naming the rule; a valid id that
        // is not registered is 404; nothing is written either way.
        let long = "d".repeat(129);
        for bad in ["a/b", "x#y", "a b", "caf\u{e9}", long.as_str()] {
            let message = admin
                .post(
                    &format!("/tenants/ids/devices/{}/telemetry", enc(bad)),
                    json!({"v": 1}),
                )
                .await
                .expect_error(400, "invalid");
            assert!(message.contains(rule), "{bad}: {message}");
            assert_eq!(series(bad).await, json!([]), "{bad}");
        }
        admin
            .post("/tenants/ids/devices/nope/telemetry", json!({"v": 1}))
            .await
            .expect_error(404, "not_found");
        admin
            .post("/tenants/ids/devices/reg-1/telemetry", json!({"v": 1}))
            .await
            .expect(200);
        hub.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_write_bodies_are_decoded_off_the_request_task() {
    bounded(120, async {
        let hub = TestHub::start().await.unwrap();
        let admin = Api::admin(&hub);
        admin.tenant("big").await;
        admin.device("big", json!({"id": "d1"})).await;
        let t0 = (now_ms() / HOUR - 2) * HOUR;
        let count = |device: &str, metric: &str| {
            let path = format!(
                "/tenants/big/devices/{device}/telemetry/{metric}?from={t0}&to={}&limit=100000",
                t0 + HOUR
            );
            let a = admin.clone();
            async move {
                a.get(&path).await.expect(200)["points"]
                    .as_array()
                    .unwrap()
                    .len()
            }
        };

        // A device payload over the inline threshold (64 KiB): 4000 points.
        let batch: Vec<Value> = (0..4000).map(|i| json!({"ts": t0 + i, "v": i})).collect();
        let body = serde_json::to_vec(&batch).unwrap();
        assert!(body.len() > 64 * 1024, "{}", body.len());
        let path = "/tenants/big/devices/d1/telemetry";
        let r = admin
            .raw(Method::POST, path, Some("application/json"), body.clone())
            .await
            .expect(200);
        assert_eq!(r, json!({"points": 4000, "rejected": []}));
        assert_eq!(count("d1", "v").await, 4000);
        // A large payload that does not decode writes nothing.
        let mut bad = body.clone();
        bad.truncate(bad.len() - 1);
        let bad: Vec<u8> = String::from_utf8(bad)
            .unwrap()
            .replace("\"v\"", "\"w\"")
            .into();
        let m = admin
            .raw(Method::POST, path, Some("application/json"), bad)
            .await
            .expect_error(400, "invalid");
        assert!(!m.is_empty());
        assert_eq!(count("d1", "w").await, 0);

        // Line protocol over the threshold: plain and gzip.
        let http = Http::new(&hub);
        let auth = format!("Token {TEST_ADMIN_TOKEN}");
        let lines = |device: &str| -> String {
            (0..4000)
                .map(|i| format!("big,device={device} v={i}i {}\n", t0 + i))
                .collect()
        };
        let plain = lines("lp1");
        assert!(plain.len() > 64 * 1024);
        let (status, body) = http
            .write(
                Some(&auth),
                "org=big&precision=ms",
                plain.into_bytes(),
                None,
            )
            .await;
        assert_eq!(status, 204, "{body}");
        assert_eq!(count("lp1", "big.v").await, 4000);
        let (status, body) = http
            .write(
                Some(&auth),
                "org=big&precision=ms",
                gzip(lines("lp2").as_bytes()),
                Some("gzip"),
            )
            .await;
        assert_eq!(status, 204, "{body}");
        assert_eq!(count("lp2", "big.v").await, 4000);
        // A bad last line rejects the whole large body; so does a body that is not UTF-8.
        let mut bad = lines("lp3");
        bad.push_str("big,device=lp3 v= 1\n");
        let (status, body) = http
            .write(Some(&auth), "org=big&precision=ms", bad.into_bytes(), None)
            .await;
        assert_eq!(
            (status, body["code"].as_str()),
            (400, Some("invalid")),
            "{body}"
        );
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .starts_with("unable to parse 'big,device=lp3 v= 1'"),
            "{body}"
        );
        assert_eq!(count("lp3", "big.v").await, 0);
        let mut not_utf8 = lines("lp4").into_bytes();
        not_utf8.extend_from_slice(b"big,device=lp4 v=1 \xff\n");
        let (status, body) = http
            .write(Some(&auth), "org=big&precision=ms", not_utf8, None)
            .await;
        assert_eq!(
            (status, body["code"].as_str()),
            (400, Some("invalid")),
            "{body}"
        );
        assert_eq!(count("lp4", "big.v").await, 0);
        hub.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_group_by_tag_walks_a_registry_of_many_pages() {
    bounded(120, async {
        let hub = TestHub::start().await.unwrap();
        let admin = Api::admin(&hub);
        admin.tenant("many").await;
        // 2500 registry devices (three pages of the registry walk): r{i} has site s{i % 3},
        // except every fifth, which has no site.
        let mut csv = String::from("id,tags\n");
        for i in 0..2500 {
            let tags = if i % 5 == 0 {
                format!("n={i}")
            } else {
                format!("site=s{};n={i}", i % 3)
            };
            csv.push_str(&format!("r{i:04},{tags}\n"));
        }
        let report = admin
            .raw(
                Method::POST,
                "/tenants/many/devices/import",
                Some("text/csv"),
                csv.into_bytes(),
            )
            .await
            .expect(200);
        assert_eq!(report["imported"], 2500, "{report}");
        // Data of devices spread over the pages, one without the tag, one not in the registry
        // (sorting after every registry device).
        let t0 = (now_ms() / HOUR - 1) * HOUR;
        let with_data = ["r0001", "r0005", "r1501", "r2499", "zz-host"];
        let lines: String = with_data
            .iter()
            .enumerate()
            .map(|(n, d)| format!("m,device={d} v={n} {t0}\n"))
            .collect();
        let (status, body) = Http::new(&hub)
            .write(
                Some(&format!("Token {TEST_ADMIN_TOKEN}")),
                "org=many&precision=ms",
                lines.into_bytes(),
                None,
            )
            .await;
        assert_eq!(status, 204, "{body}");
        let agg = |q: &str| {
            let a = admin.clone();
            let path = format!(
                "/tenants/many/telemetry/aggregate?metric=m.v&bucket=1h&fn=count,sum&from={t0}&to={}&{q}",
                t0 + HOUR
            );
            async move {
                let v = a.get(&path).await.expect(200);
                v["groups"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|g| {
                        (
                            g["group"].as_str().map(str::to_string),
                            g["series"].as_u64().unwrap(),
                            g["buckets"][0]["sum"].as_f64().unwrap(),
                        )
                    })
                    .collect::<Vec<_>>()
            }
        };
        let s = |v: &str| Some(v.to_string());
        // Every device with the metric: tags found on every page; r0005 and zz-host have none.
        assert_eq!(
            agg("by=tag:site").await,
            vec![(None, 2, 1.0 + 4.0), (s("s0"), 1, 3.0), (s("s1"), 2, 0.0 + 2.0)]
        );
        // A device list that ends early in the registry.
        assert_eq!(
            agg("by=tag:site&devices=r0001,r0005").await,
            vec![(None, 1, 1.0), (s("s1"), 1, 0.0)]
        );
        // A registry selection (every device with site s1, on all pages) narrowed by a list.
        assert_eq!(
            agg("by=tag:n&tag=site:s1&devices=r0001,r1501,r2499").await,
            vec![(s("1"), 1, 0.0), (s("1501"), 1, 2.0)]
        );
        assert_eq!(
            agg("by=device&tag=site:s0").await,
            vec![(s("r2499"), 1, 3.0)]
        );
        hub.stop().await;
    })
    .await;
}
