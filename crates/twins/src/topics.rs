//! The reserved device topics of twins and commands (specified in `docs/device-api.md`).
//!
//! ```text
//! $devices/{device}/twin/get                       device → hub  (payload optional: {"clientToken"})
//! $devices/{device}/twin/get/accepted|rejected     hub → device
//! $devices/{device}/twin/update                    device → hub  ({"reported":{…}, "version"?, "clientToken"?, "rejected"?})
//! $devices/{device}/twin/update/accepted|rejected  hub → device
//! $devices/{device}/twin/delta                     hub → device  (desired keys that differ from reported)
//! $devices/{device}/twin/documents                 hub → device  (previous and current after each update)
//! $devices/{device}/twin/name/{name}/…             the same for a named twin
//! $devices/{device}/commands/req/{command}/{rid}   hub → device  (a command request)
//! $devices/{device}/commands/res/{rid}[/{status}]  device → hub  (its response)
//! ```

/// The topic prefix of a twin (`$devices/{d}/twin` or `$devices/{d}/twin/name/{n}`).
pub fn twin_prefix(device: &str, name: &str) -> String {
    if name.is_empty() {
        format!("$devices/{device}/twin")
    } else {
        format!("$devices/{device}/twin/name/{name}")
    }
}

/// The delta topic of a twin.
pub fn delta(device: &str, name: &str) -> String {
    format!("{}/delta", twin_prefix(device, name))
}

/// A command request topic.
pub fn command_request(device: &str, command: &str, request_id: &str) -> String {
    format!("$devices/{device}/commands/req/{command}/{request_id}")
}

/// The response topic of a command request.
pub fn command_response(device: &str, request_id: &str) -> String {
    format!("$devices/{device}/commands/res/{request_id}")
}

/// What a device published on a reserved topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceTopic<'a> {
    /// A twin operation.
    Twin {
        /// The device named in the topic.
        device: &'a str,
        /// The twin name (empty for the default twin).
        name: &'a str,
        /// The operation.
        op: TwinOp,
    },
    /// A command response.
    CommandResponse {
        /// The device named in the topic.
        device: &'a str,
        /// The request id.
        request_id: &'a str,
        /// The status given in the topic, if any.
        status: Option<u16>,
    },
}

/// Twin operations a device can publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TwinOp {
    /// Read the twin.
    Get,
    /// Update reported (and reject desired keys).
    Update,
}

/// Parses a topic a device published on; `None` if it is not one of ours (e.g. the hub's own
/// `accepted`/`rejected` answers, which devices must not publish).
pub fn parse(topic: &str) -> Option<DeviceTopic<'_>> {
    let rest = topic.strip_prefix("$devices/")?;
    let (device, rest) = rest.split_once('/')?;
    if device.is_empty() {
        return None;
    }
    let mut parts = rest.split('/');
    match parts.next()? {
        "twin" => {
            let (name, op) = match (parts.next()?, parts.next(), parts.next(), parts.next()) {
                ("name", Some(n), Some(op), None) if !n.is_empty() => (n, op),
                (op, None, _, _) => ("", op),
                _ => return None,
            };
            let op = match op {
                "get" => TwinOp::Get,
                "update" => TwinOp::Update,
                _ => return None,
            };
            Some(DeviceTopic::Twin { device, name, op })
        }
        "commands" => {
            if parts.next()? != "res" {
                return None;
            }
            let request_id = parts.next()?;
            let status = match parts.next() {
                None => None,
                Some(s) => Some(s.parse::<u16>().ok()?),
            };
            if parts.next().is_some() || request_id.is_empty() {
                return None;
            }
            Some(DeviceTopic::CommandResponse {
                device,
                request_id,
                status,
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_topics() {
        assert_eq!(
            parse("$devices/d1/twin/update"),
            Some(DeviceTopic::Twin {
                device: "d1",
                name: "",
                op: TwinOp::Update
            })
        );
        assert_eq!(
            parse("$devices/d1/twin/name/fw/get"),
            Some(DeviceTopic::Twin {
                device: "d1",
                name: "fw",
                op: TwinOp::Get
            })
        );
        assert_eq!(
            parse("$devices/d1/commands/res/abc/200"),
            Some(DeviceTopic::CommandResponse {
                device: "d1",
                request_id: "abc",
                status: Some(200)
            })
        );
        assert_eq!(
            parse("$devices/d1/commands/res/abc"),
            Some(DeviceTopic::CommandResponse {
                device: "d1",
                request_id: "abc",
                status: None
            })
        );
        for bad in [
            "$devices/d1/twin/update/accepted",
            "$devices/d1/twin/delta",
            "$devices//twin/get",
            "$devices/d1/twin/name//get",
            "$devices/d1/commands/req/reboot/1",
            "$devices/d1/commands/res/abc/x",
            "$devices/d1/commands/res/abc/200/x",
            "devices/d1/twin/get",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn builds_topics() {
        assert_eq!(delta("d", ""), "$devices/d/twin/delta");
        assert_eq!(delta("d", "fw"), "$devices/d/twin/name/fw/delta");
        assert_eq!(
            command_request("d", "reboot", "r1"),
            "$devices/d/commands/req/reboot/r1"
        );
        assert_eq!(command_response("d", "r1"), "$devices/d/commands/res/r1");
    }
}
