//! A device's connectivity with disconnect reasons and its history
//! (`GET /tenants/{tenant}/devices/{device}/connectivity`), driven by a real MQTT client.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

/// An MQTT 3.1.1 CONNECT with user name and password, clean session.
fn connect_packet(client_id: &str, username: &str, password: &str, keep_alive: u16) -> Vec<u8> {
    let field = |out: &mut Vec<u8>, s: &str| {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    };
    let mut body = Vec::new();
    field(&mut body, "MQTT");
    body.push(4); // protocol level 3.1.1
    body.push(0x80 | 0x40 | 0x02); // user name, password, clean session
    body.extend_from_slice(&keep_alive.to_be_bytes());
    field(&mut body, client_id);
    field(&mut body, username);
    field(&mut body, password);
    let mut packet = vec![0x10];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        packet.push(byte);
        if len == 0 {
            break;
        }
    }
    packet.extend_from_slice(&body);
    packet
}

/// Connects over MQTT/TCP and waits for a successful CONNACK.
async fn mqtt_connect(hub: &TestHub, username: &str, password: &str, keep_alive: u16) -> TcpStream {
    let mut s = TcpStream::connect(hub.mqtt).await.unwrap();
    s.write_all(&connect_packet("d1", username, password, keep_alive))
        .await
        .unwrap();
    let mut connack = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut connack))
        .await
        .expect("no CONNACK")
        .unwrap();
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00], "connect refused");
    s
}

/// Waits until the server closes the socket.
async fn until_closed(s: &mut TcpStream, within: Duration) {
    let mut buf = [0u8; 64];
    tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the server did not close the connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_reasons_and_history_of_a_real_mqtt_client() {
    bounded(90, async {
        let hub = TestHub::start().await.unwrap();
        let admin = Api::admin(&hub);
        admin.tenant("conn").await;
        admin.device("conn", json!({"id": "d1"})).await;
        let cred = admin
            .post(
                "/tenants/conn/devices/d1/credentials",
                json!({"kind": "password"}),
            )
            .await
            .expect(201);
        let secret = cred["secret"].as_str().unwrap().to_string();
        let path = "/tenants/conn/devices/d1/connectivity";

        // Never connected: no history.
        let v = admin.get(path).await.expect(200);
        assert_eq!(v["current"]["online"], false);
        assert_eq!(v["current"]["last_connected_at"], Value::Null);
        assert_eq!(v["events"], json!([]));
        assert_eq!(v["next"], Value::Null);

        let offline = |v: &Value| v["current"]["online"] == false;
        // 1. A clean DISCONNECT.
        let mut s = mqtt_connect(&hub, "conn/d1", &secret, 60).await;
        wait_for(&admin, path, |v| v["current"]["online"] == true).await;
        s.write_all(&[0xE0, 0x00]).await.unwrap();
        until_closed(&mut s, Duration::from_secs(10)).await;
        let v = wait_for(&admin, path, offline).await;
        assert_eq!(v["current"]["disconnect_reason"], "client_disconnect");

        // 2. The socket just goes away.
        let s = mqtt_connect(&hub, "conn/d1", &secret, 60).await;
        wait_for(&admin, path, |v| v["current"]["online"] == true).await;
        drop(s);
        let v = wait_for(&admin, path, offline).await;
        assert_eq!(v["current"]["disconnect_reason"], "connection_lost");

        // 3. Silence past the keep-alive (1 s; the hub waits 1.5 s).
        let mut s = mqtt_connect(&hub, "conn/d1", &secret, 1).await;
        until_closed(&mut s, Duration::from_secs(10)).await;
        let v = wait_for(&admin, path, offline).await;
        assert_eq!(v["current"]["disconnect_reason"], "keep_alive_timeout");

        // The history (flushed every second), newest first.
        let v = wait_for(&admin, path, |v| {
            v["events"].as_array().is_some_and(|e| e.len() == 6)
        })
        .await;
        let events = v["events"].as_array().unwrap();
        let got: Vec<(&str, &str)> = events
            .iter()
            .map(|e| {
                (
                    e["event"].as_str().unwrap(),
                    e["reason"].as_str().unwrap_or("-"),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("disconnected", "keep_alive_timeout"),
                ("connected", "-"),
                ("disconnected", "connection_lost"),
                ("connected", "-"),
                ("disconnected", "client_disconnect"),
                ("connected", "-"),
            ]
        );
        for w in events.windows(2) {
            assert!(w[0]["seq"].as_i64() > w[1]["seq"].as_i64());
            assert!(w[0]["at"].as_i64() >= w[1]["at"].as_i64());
        }
        for e in events {
            assert_eq!(e["client_id"], "d1");
            assert_eq!(e["protocol"], "mqtt");
            assert!(e["remote_addr"].as_str().unwrap().starts_with("127.0.0.1:"));
        }
        let current = &v["current"];
        assert_eq!(current["online"], false);
        assert!(current["last_connected_at"].as_i64() <= current["last_disconnected_at"].as_i64());
        assert_eq!(current["last_disconnected_at"], events[0]["at"]);
        assert_eq!(current["last_connected_at"], events[1]["at"]);

        // The device itself carries the same connectivity.
        let d = admin.get("/tenants/conn/devices/d1").await.expect(200);
        assert_eq!(d["connectivity"]["disconnect_reason"], "keep_alive_timeout");
        assert_eq!(
            d["connectivity"]["last_disconnected_at"],
            current["last_disconnected_at"]
        );

        // Online again: the last disconnect stays, as history.
        let s = mqtt_connect(&hub, "conn/d1", &secret, 60).await;
        let v = wait_for(&admin, path, |v| v["current"]["online"] == true).await;
        assert_eq!(v["current"]["disconnect_reason"], "keep_alive_timeout");
        assert!(
            v["current"]["last_connected_at"].as_i64()
                > v["current"]["last_disconnected_at"].as_i64()
        );
        drop(s);
        wait_for(&admin, path, offline).await;

        // Paging.
        let p1 = admin.get(&format!("{path}?limit=4")).await.expect(200);
        assert_eq!(p1["events"].as_array().unwrap().len(), 4);
        let next = p1["next"].as_i64().expect("a next page");
        let p2 = admin
            .get(&format!("{path}?limit=4&before={next}"))
            .await
            .expect(200);
        let older = p2["events"].as_array().unwrap();
        assert!(!older.is_empty());
        assert!(older.iter().all(|e| e["seq"].as_i64() < Some(next)));

        // Parameters and scope.
        admin
            .get(&format!("{path}?limit=0"))
            .await
            .expect_error(400, "invalid");
        admin
            .get(&format!("{path}?colour=red"))
            .await
            .expect_error(400, "invalid");
        admin
            .get("/tenants/conn/devices/ghost/connectivity")
            .await
            .expect_error(404, "not_found");
        let token = admin.token("viewer", Some("conn")).await;
        admin.with_token(Some(&token)).get(path).await.expect(200);
        admin.tenant("other").await;
        let token = admin.token("viewer", Some("other")).await;
        admin
            .with_token(Some(&token))
            .get(path)
            .await
            .expect_error(404, "not_found");

        // Decommissioning takes the history with it.
        admin.delete("/tenants/conn/devices/d1").await.expect(200);
        admin.device("conn", json!({"id": "d1"})).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let v = admin.get(path).await.expect(200);
        assert_eq!(v["events"], json!([]), "{v}");
        hub.stop().await;
    })
    .await;
}
