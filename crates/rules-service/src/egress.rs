//! Where webhooks may send requests. With `webhook_deny_private` (for hubs whose tenants do not
//! trust each other), a rule cannot make the hub reach its own network: loopback, private,
//! link-local, carrier-grade NAT, unique-local, multicast and unspecified addresses are refused —
//! as literal IPs in the URL (checked before each request and on every redirect) and behind
//! names (the resolver drops such addresses, so a name with only those fails).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Whether `ip` is on a network a tenant's webhook must not reach.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                // 100.64.0.0/10 (carrier-grade NAT) and 0.0.0.0/8.
                || (o[0] == 100 && (o[1] & 0xC0) == 64)
                || o[0] == 0
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_private(IpAddr::V4(v4));
            }
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                // fc00::/7 unique local, fe80::/10 link local.
                || (s[0] & 0xFE00) == 0xFC00
                || (s[0] & 0xFFC0) == 0xFE80
        }
    }
}

/// The refusal for a URL whose host is a private IP literal, if it is one.
pub fn private_literal(url: &reqwest::Url) -> Option<String> {
    let ip = match url.host()? {
        url::Host::Ipv4(ip) => IpAddr::V4(ip),
        url::Host::Ipv6(ip) => IpAddr::V6(ip),
        url::Host::Domain(_) => return None,
    };
    is_private(ip)
        .then(|| format!("{ip} is a private address and rules.webhook_deny_private is on"))
}

/// Resolves names to their public addresses only.
struct PublicOnly;

impl Resolve for PublicOnly {
    fn resolve(&self, name: Name) -> Resolving {
        Box::pin(async move {
            let host = name.as_str().to_string();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> =
                found.into_iter().filter(|a| !is_private(a.ip())).collect();
            if public.is_empty() {
                return Err(format!(
                    "{host} resolves only to private addresses and rules.webhook_deny_private is on"
                )
                .into());
            }
            let addrs: Addrs = Box::new(public.into_iter());
            Ok(addrs)
        })
    }
}

/// The HTTP client of webhook actions.
pub fn client(deny_private: bool) -> reqwest::Client {
    let mut b = reqwest::Client::builder();
    if deny_private {
        b = b
            .dns_resolver(Arc::new(PublicOnly))
            .redirect(reqwest::redirect::Policy::custom(|attempt| {
                if let Some(why) = private_literal(attempt.url()) {
                    attempt.error(why)
                } else if attempt.previous().len() >= 10 {
                    attempt.stop()
                } else {
                    attempt.follow()
                }
            }));
    }
    b.build().unwrap_or_else(|e| {
        tracing::error!(error = %e, "building the webhook HTTP client failed; using the default");
        reqwest::Client::new()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_ranges() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fc00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
            "224.0.0.1",
        ] {
            assert!(is_private(ip.parse().expect("ip")), "{ip}");
        }
        for ip in [
            "8.8.8.8",
            "100.128.0.1",
            "2001:4860:4860::8888",
            "172.32.0.1",
        ] {
            assert!(!is_private(ip.parse().expect("ip")), "{ip}");
        }
        let url = |u: &str| reqwest::Url::parse(u).expect("url");
        assert!(private_literal(&url("http://169.254.169.254/latest/meta-data")).is_some());
        assert!(private_literal(&url("http://[::1]:8080/")).is_some());
        assert!(private_literal(&url("https://example.com/")).is_none());
    }
}
