//! Chaos and reconnects: what a misbehaving network or device does to a simulated fleet.
//!
//! Every random choice is a draw keyed by (seed, device index, purpose, counter) like the
//! generators' (see `rng`), so a run with the same seed takes the same chaos actions in the same
//! order on each device (their wall-clock times depend on the broker's answers, as always).

use std::time::Duration;

use ferrohub_proto::mqtt::{self, ProtocolVersion};

use super::generate::device_key;
use super::rng::{derive, uniform, unit};

const SALT_BACKOFF: u64 = 0xC4A0_0001;
const SALT_DISCONNECT: u64 = 0xC4A0_0002;
const SALT_PAUSE: u64 = 0xC4A0_0003;
const SALT_LATENCY: u64 = 0xC4A0_0004;
const SALT_LOSS: u64 = 0xC4A0_0005;
const SALT_SKEW: u64 = 0xC4A0_0006;
const SALT_BURST: u64 = 0xC4A0_0007;
const SALT_MISBEHAVE: u64 = 0xC4A0_0008;
const SALT_MISBEHAVE_MSG: u64 = 0xC4A0_0009;
const SALT_MISBEHAVE_KIND: u64 = 0xC4A0_000A;

/// Share of a misbehaving device's messages that come with a misbehaviour.
pub const MISBEHAVE_RATE: f64 = 0.2;
/// Copies of a message a flooding device sends at once (QoS 0).
pub const FLOOD_COPIES: usize = 50;

/// How devices reconnect after a lost connection or a failed connect.
#[derive(Debug, Clone)]
pub struct Reconnect {
    /// First back-off (doubled each failed attempt).
    pub min: Duration,
    /// Largest back-off.
    pub max: Duration,
    /// Consecutive failed attempts after which a device gives up (0: it never reconnects).
    pub attempts: u32,
    /// Failed first connects retried (0: a device whose first connect fails gives up at once).
    pub connect_retries: u32,
}

impl Default for Reconnect {
    fn default() -> Reconnect {
        Reconnect {
            min: Duration::from_millis(100),
            max: Duration::from_secs(5),
            attempts: 10,
            connect_retries: 0,
        }
    }
}

impl Reconnect {
    /// The pause before attempt `attempt` (0-based) of a device: exponential, capped at `max`,
    /// with "equal jitter" (uniform in the upper half), keyed by `n` (the device's attempt count).
    pub fn backoff(&self, seed: u64, index: u64, attempt: u32, n: u64) -> Duration {
        let base = self
            .min
            .saturating_mul(1u32.checked_shl(attempt.min(30)).unwrap_or(u32::MAX))
            .min(self.max);
        let key = derive(derive(device_key(seed, index), SALT_BACKOFF), n);
        base.mul_f64(uniform(key, 0.5, 1.0))
    }
}

/// The chaos options of a run (all off by default).
#[derive(Debug, Clone, Default)]
pub struct Chaos {
    /// Mean random disconnects per device per minute (0: none).
    pub disconnect_per_min: f64,
    /// Application-level delay before each publish, uniform in this range.
    pub latency: Option<(Duration, Duration)>,
    /// Share of messages skipped (never sent).
    pub loss: f64,
    /// Each device's timestamps are offset by its own draw in ±this.
    pub clock_skew: Duration,
    /// Bursts: `n` messages at once, about every `interval` per device.
    pub burst: Option<(u32, Duration)>,
    /// Share of devices that misbehave.
    pub misbehave: f64,
}

/// What a misbehaving device does with one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misbehaviour {
    /// A payload above the broker's maximum packet size.
    Oversized,
    /// A payload that is not valid JSON.
    Malformed,
    /// The message many times at once.
    Flood,
    /// A packet that breaks the MQTT packet format or protocol, written raw on the socket (the
    /// broker must close the connection: MQTT 5 with DISCONNECT 0x81 or 0x82).
    Packet(BadPacket),
}

/// Packet-level malformations of `--chaos-misbehave`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadPacket {
    /// A PUBLISH with QoS 3 (both QoS bits set): malformed.
    Qos3,
    /// A Remaining Length of five bytes (at most four are allowed): malformed.
    RemainingLength,
    /// A PUBLISH whose topic is not UTF-8: malformed.
    TopicUtf8,
    /// A SUBSCRIBE whose reserved header flags are 0000 instead of 0010: malformed.
    ReservedFlags,
    /// A second CONNECT on a connected session: a protocol error.
    SecondConnect,
}

impl BadPacket {
    /// Every kind, in draw order.
    pub const ALL: [BadPacket; 5] = [
        BadPacket::Qos3,
        BadPacket::RemainingLength,
        BadPacket::TopicUtf8,
        BadPacket::ReservedFlags,
        BadPacket::SecondConnect,
    ];

    /// Its chaos counter.
    pub fn action(self) -> Action {
        match self {
            BadPacket::Qos3 => Action::PacketQos3,
            BadPacket::RemainingLength => Action::PacketLength,
            BadPacket::TopicUtf8 => Action::PacketUtf8,
            BadPacket::ReservedFlags => Action::PacketFlags,
            BadPacket::SecondConnect => Action::PacketConnect,
        }
    }

    /// The raw bytes, for a device `client_id` publishing on `topic`.
    pub fn bytes(self, version: ProtocolVersion, client_id: &str, topic: &str) -> Vec<u8> {
        let v5 = version.is_v5();
        // A QoS 0 PUBLISH with a 2-byte payload: fixed header, topic, properties (v5), payload.
        let publish = |first: u8, topic: &[u8]| {
            let mut body = Vec::with_capacity(topic.len() + 8);
            body.extend_from_slice(&u16::try_from(topic.len()).unwrap_or(0).to_be_bytes());
            body.extend_from_slice(topic);
            if v5 {
                body.push(0);
            }
            body.extend_from_slice(b"{}");
            let mut out = vec![first];
            push_vbi(&mut out, body.len());
            out.extend_from_slice(&body);
            out
        };
        match self {
            BadPacket::Qos3 => {
                // QoS bits 11 need a packet id to be read; the codec refuses it first.
                let mut p = publish(0x36, topic.as_bytes());
                p.extend_from_slice(&[0, 1]);
                if let Some(len) = p.get_mut(1) {
                    *len = len.wrapping_add(2);
                }
                p
            }
            BadPacket::RemainingLength => vec![0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01],
            BadPacket::TopicUtf8 => {
                let mut t = b"devices/".to_vec();
                t.extend_from_slice(&[0xC3, 0x28, 0xFF]);
                publish(0x30, &t)
            }
            BadPacket::ReservedFlags => {
                // SUBSCRIBE packet id 1, "a/b" at QoS 0, with header 0x80 instead of 0x82.
                let mut body = vec![0, 1];
                if v5 {
                    body.push(0);
                }
                body.extend_from_slice(&[0, 3, b'a', b'/', b'b', 0]);
                let mut out = vec![0x80];
                push_vbi(&mut out, body.len());
                out.extend_from_slice(&body);
                out
            }
            BadPacket::SecondConnect => {
                let connect = mqtt::Connect {
                    protocol: version,
                    clean_start: true,
                    keep_alive: 60,
                    client_id: client_id.to_string(),
                    will: None,
                    username: None,
                    password: None,
                    properties: mqtt::ConnectProperties::default(),
                };
                let mut buf = bytes::BytesMut::new();
                match mqtt::encode(&mqtt::Packet::Connect(Box::new(connect)), version, &mut buf) {
                    Ok(()) => buf.to_vec(),
                    // Unreachable for a client id of a device; still a bad packet.
                    Err(_) => vec![0x10, 0x00],
                }
            }
        }
    }
}

/// Appends an MQTT Variable Byte Integer.
fn push_vbi(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return;
        }
    }
}

/// Chaos actions, counted by kind in the summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// A device dropped its connection.
    Disconnect,
    /// A publish was delayed.
    Latency,
    /// A message was skipped.
    Loss,
    /// A burst started.
    Burst,
    /// An oversized payload was sent.
    Oversized,
    /// A malformed payload was sent.
    Malformed,
    /// A flood was sent.
    Flood,
    /// A PUBLISH with QoS 3 was sent.
    PacketQos3,
    /// A packet with a bad Remaining Length was sent.
    PacketLength,
    /// A PUBLISH with a topic that is not UTF-8 was sent.
    PacketUtf8,
    /// A packet with reserved header flags set wrong was sent.
    PacketFlags,
    /// A second CONNECT was sent.
    PacketConnect,
}

impl Action {
    /// Every kind, in summary order.
    pub const ALL: [Action; 12] = [
        Action::Disconnect,
        Action::Latency,
        Action::Loss,
        Action::Burst,
        Action::Oversized,
        Action::Malformed,
        Action::Flood,
        Action::PacketQos3,
        Action::PacketLength,
        Action::PacketUtf8,
        Action::PacketFlags,
        Action::PacketConnect,
    ];

    /// Its name in the summary.
    pub fn name(self) -> &'static str {
        match self {
            Action::Disconnect => "disconnect",
            Action::Latency => "latency",
            Action::Loss => "loss",
            Action::Burst => "burst",
            Action::Oversized => "oversized",
            Action::Malformed => "malformed",
            Action::Flood => "flood",
            Action::PacketQos3 => "packet_qos3",
            Action::PacketLength => "packet_length",
            Action::PacketUtf8 => "packet_utf8",
            Action::PacketFlags => "packet_flags",
            Action::PacketConnect => "packet_connect",
        }
    }
}

impl Chaos {
    /// Whether any chaos is on.
    pub fn any(&self) -> bool {
        self.disconnect_per_min > 0.0
            || self.latency.is_some()
            || self.loss > 0.0
            || !self.clock_skew.is_zero()
            || self.burst.is_some()
            || self.misbehave > 0.0
    }

    /// Time from connection `conn` of a device to its next random disconnect (exponential).
    pub fn disconnect_after(&self, seed: u64, index: u64, conn: u64) -> Option<Duration> {
        if self.disconnect_per_min <= 0.0 {
            return None;
        }
        let mean = 60.0 / self.disconnect_per_min;
        let key = derive(derive(device_key(seed, index), SALT_DISCONNECT), conn);
        Some(Duration::from_secs_f64(exponential(key, mean).min(1e9)))
    }

    /// The pause after random disconnect `conn`, uniform in `[min, 10 × min]` of the back-off
    /// (capped at its max).
    pub fn pause(&self, r: &Reconnect, seed: u64, index: u64, conn: u64) -> Duration {
        let key = derive(derive(device_key(seed, index), SALT_PAUSE), conn);
        let hi = r.min.saturating_mul(10).min(r.max).max(r.min);
        r.min + (hi - r.min).mul_f64(unit(key))
    }

    /// The delay before message `m` of a device.
    pub fn latency(&self, seed: u64, index: u64, m: u64) -> Option<Duration> {
        let (lo, hi) = self.latency?;
        let key = derive(derive(device_key(seed, index), SALT_LATENCY), m);
        Some(lo + hi.saturating_sub(lo).mul_f64(unit(key)))
    }

    /// Whether message `m` of a device is lost.
    pub fn lost(&self, seed: u64, index: u64, m: u64) -> bool {
        self.loss > 0.0 && unit(derive(derive(device_key(seed, index), SALT_LOSS), m)) < self.loss
    }

    /// A device's clock skew, milliseconds.
    pub fn skew_ms(&self, seed: u64, index: u64) -> i64 {
        if self.clock_skew.is_zero() {
            return 0;
        }
        let d = self.clock_skew.as_secs_f64() * 1000.0;
        uniform(derive(device_key(seed, index), SALT_SKEW), -d, d).round() as i64
    }

    /// Time from burst `k` (or the first message, for 0) of a device to the next (exponential
    /// around the burst interval).
    pub fn burst_after(&self, seed: u64, index: u64, k: u64) -> Option<(u32, Duration)> {
        let (n, every) = self.burst?;
        let key = derive(derive(device_key(seed, index), SALT_BURST), k);
        Some((
            n,
            Duration::from_secs_f64(exponential(key, every.as_secs_f64()).min(1e9)),
        ))
    }

    /// Whether a device misbehaves (chosen by the seed; the same devices in every run).
    pub fn misbehaves(&self, seed: u64, index: u64) -> bool {
        misbehaves(self.misbehave, seed, index)
    }

    /// What a misbehaving device does with message `m`, if anything.
    pub fn misbehaviour(&self, seed: u64, index: u64, m: u64) -> Option<Misbehaviour> {
        let key = derive(device_key(seed, index), SALT_MISBEHAVE_MSG);
        if unit(derive(key, m)) >= MISBEHAVE_RATE {
            return None;
        }
        let kind = unit(derive(derive(key, SALT_MISBEHAVE_KIND), m));
        Some(if kind < 0.15 {
            Misbehaviour::Oversized
        } else if kind < 0.6 {
            Misbehaviour::Malformed
        } else if kind < 0.75 {
            Misbehaviour::Flood
        } else {
            let k = ((kind - 0.75) / 0.25 * BadPacket::ALL.len() as f64) as usize;
            Misbehaviour::Packet(BadPacket::ALL[k.min(BadPacket::ALL.len() - 1)])
        })
    }
}

/// Whether device `index` is one of the `fraction` that misbehave under `seed`.
pub fn misbehaves(fraction: f64, seed: u64, index: u64) -> bool {
    fraction > 0.0 && unit(derive(device_key(seed, index), SALT_MISBEHAVE)) < fraction
}

/// An exponential draw with this mean.
fn exponential(key: u64, mean: f64) -> f64 {
    -(1.0 - unit(key)).ln() * mean
}

/// `--chaos-disconnect`: a number is disconnects per device per minute; a duration the mean
/// time between two.
pub fn parse_rate(s: &str) -> Result<f64, String> {
    let t = s.trim();
    if let Ok(v) = t.parse::<f64>() {
        if v.is_finite() && v >= 0.0 {
            return Ok(v);
        }
        return Err(format!("{s:?}: expected a non-negative rate per minute"));
    }
    let d = humantime::parse_duration(t).map_err(|_| {
        format!("{s:?}: expected disconnects per device per minute (0.5) or a mean interval (2m)")
    })?;
    if d.is_zero() {
        return Err(format!("{s:?}: the mean interval must be above zero"));
    }
    Ok(60.0 / d.as_secs_f64())
}

/// A duration where a plain number means milliseconds.
fn parse_ms(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if let Ok(v) = t.parse::<f64>() {
        if (0.0..=1e12).contains(&v) {
            return Ok(Duration::from_secs_f64(v / 1000.0));
        }
        return Err(format!("{s:?} is not a delay"));
    }
    humantime::parse_duration(t).map_err(|_| format!("{s:?} is not a delay such as 50 or 50ms"))
}

/// `--chaos-latency`: `MS` or `MS..MS` (plain numbers are milliseconds; "20ms..1s" works too).
pub fn parse_latency(s: &str) -> Result<(Duration, Duration), String> {
    let (lo, hi) = match s.split_once("..") {
        Some((a, b)) => (parse_ms(a)?, parse_ms(b)?),
        None => {
            let d = parse_ms(s)?;
            (d, d)
        }
    };
    if hi < lo {
        return Err(format!("{s:?}: the upper bound is below the lower"));
    }
    Ok((lo, hi))
}

/// `--reconnect-backoff`: `MIN[..MAX]` (plain numbers are milliseconds).
pub fn parse_backoff(s: &str) -> Result<(Duration, Duration), String> {
    let (lo, hi) = match s.split_once("..") {
        Some((a, b)) => (parse_ms(a)?, parse_ms(b)?),
        None => {
            let d = parse_ms(s)?;
            (d, d.saturating_mul(50))
        }
    };
    if lo.is_zero() || hi < lo {
        return Err(format!("{s:?}: expected MIN[..MAX] with 0 < MIN <= MAX"));
    }
    Ok((lo, hi))
}

/// A fraction in `[0, 1]`.
pub fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?}: expected a fraction between 0 and 1")),
    }
}

/// `--chaos-burst`: `N[@INTERVAL]` (default interval 1m).
pub fn parse_burst(s: &str) -> Result<(u32, Duration), String> {
    let (n, every) = match s.split_once('@') {
        Some((n, e)) => (n, super::parse_duration(e)?),
        None => (s, Duration::from_secs(60)),
    };
    let n: u32 = n
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: expected N[@INTERVAL], e.g. 20@30s"))?;
    if n == 0 || every.is_zero() {
        return Err(format!("{s:?}: N and the interval must be above zero"));
    }
    Ok((n, every))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parsing() {
        assert_eq!(parse_rate("0.5").unwrap(), 0.5);
        assert_eq!(parse_rate("2m").unwrap(), 0.5);
        assert!(parse_rate("-1").is_err() && parse_rate("0s").is_err());
        assert_eq!(
            parse_latency("10..30").unwrap(),
            (Duration::from_millis(10), Duration::from_millis(30))
        );
        assert_eq!(parse_latency("1s").unwrap().1, Duration::from_secs(1));
        assert!(parse_latency("30..10").is_err());
        assert_eq!(
            parse_burst("20@30s").unwrap(),
            (20, Duration::from_secs(30))
        );
        assert_eq!(parse_burst("5").unwrap().1, Duration::from_secs(60));
        assert!(parse_burst("0").is_err() && parse_burst("x@1s").is_err());
        assert!(parse_fraction("1.5").is_err());
        assert!(parse_backoff("0").is_err());
    }

    #[test]
    fn bad_packets_are_refused_by_the_codec_with_the_expected_reason() {
        for version in [ProtocolVersion::V5, ProtocolVersion::V311] {
            for kind in BadPacket::ALL {
                let raw = kind.bytes(version, "sim-1", "devices/sim-1/telemetry");
                let mut buf = bytes::BytesMut::from(&raw[..]);
                let got = mqtt::decode(&mut buf, version, 1 << 20);
                match kind {
                    // Well-formed: the broker refuses it as a protocol error (0x82) once connected.
                    BadPacket::SecondConnect => {
                        assert!(matches!(got, Ok(Some(mqtt::Packet::Connect(_)))), "{got:?}")
                    }
                    _ => {
                        let Err(e) = got else {
                            panic!("{kind:?} {version:?} decoded: {got:?}")
                        };
                        assert_eq!(
                            e.reason_code(),
                            mqtt::reason::MALFORMED_PACKET,
                            "{kind:?} {e}"
                        );
                    }
                }
            }
        }
        let c = Chaos {
            misbehave: 1.0,
            ..Chaos::default()
        };
        let kinds: std::collections::HashSet<_> = (0..5000)
            .filter_map(|m| c.misbehaviour(3, 1, m))
            .collect::<Vec<_>>()
            .into_iter()
            .map(|k| format!("{k:?}"))
            .collect();
        assert_eq!(kinds.len(), 3 + BadPacket::ALL.len(), "{kinds:?}");
    }

    #[test]
    fn draws_are_deterministic_and_bounded() {
        let c = Chaos {
            disconnect_per_min: 6.0,
            latency: Some((Duration::from_millis(5), Duration::from_millis(9))),
            loss: 0.1,
            clock_skew: Duration::from_secs(2),
            burst: Some((3, Duration::from_secs(1))),
            misbehave: 0.5,
        };
        let r = Reconnect::default();
        for i in 0..200 {
            assert_eq!(c.disconnect_after(1, i, 0), c.disconnect_after(1, i, 0));
            assert!(c.skew_ms(1, i).abs() <= 2000);
            let l = c.latency(1, i, 3).unwrap();
            assert!(l >= Duration::from_millis(5) && l <= Duration::from_millis(9));
            for a in 0..40 {
                let b = r.backoff(1, i, a, u64::from(a));
                assert!(b <= r.max && b >= r.min / 2, "{b:?}");
            }
            let p = c.pause(&r, 1, i, 0);
            assert!(p >= r.min && p <= r.max);
        }
        let lost = (0..10_000).filter(|m| c.lost(1, 0, *m)).count();
        assert!((900..1100).contains(&lost), "{lost}");
        let bad = (0..1000).filter(|i| c.misbehaves(1, *i)).count();
        assert!((420..580).contains(&bad), "{bad}");
        assert!(!Chaos::default().any() && c.any());
    }
}
