//! A small JSON client for the operator API of a real test hub.

use std::future::Future;
use std::time::Duration;

pub use ferrohub_testkit::{TEST_ADMIN_TOKEN, TestHub};
pub use reqwest::{Method, StatusCode};
pub use serde_json::{Value, json};

/// Runs a test body with a deadline.
pub async fn bounded<F: Future<Output = ()>>(secs: u64, f: F) {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .unwrap_or_else(|_| panic!("test did not finish within {secs} s"));
}

/// A response: status and body (JSON, `Null` when empty, a string when not JSON).
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: String,
    pub body: Value,
}

impl Reply {
    /// Asserts the status and returns the body.
    #[track_caller]
    pub fn expect(self, status: u16) -> Value {
        assert_eq!(self.status.as_u16(), status, "unexpected reply: {self:?}");
        self.body
    }

    /// Asserts an error status and code; returns the message.
    #[track_caller]
    pub fn expect_error(self, status: u16, code: &str) -> String {
        assert_eq!(self.status.as_u16(), status, "unexpected reply: {self:?}");
        assert!(
            self.content_type.starts_with("application/json"),
            "error is not JSON: {self:?}"
        );
        assert_eq!(self.body["code"], code, "unexpected error code: {self:?}");
        let msg = self.body["message"].as_str().expect("message").to_string();
        assert!(!msg.is_empty());
        msg
    }
}

/// A client of one hub with one token.
#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
    pub token: Option<String>,
}

impl Api {
    /// The platform admin of a test hub.
    pub fn admin(hub: &TestHub) -> Api {
        Api {
            http: reqwest::Client::new(),
            base: hub.api_url(),
            token: Some(TEST_ADMIN_TOKEN.into()),
        }
    }

    /// The same hub with another token (or none).
    pub fn with_token(&self, token: Option<&str>) -> Api {
        Api {
            token: token.map(str::to_string),
            ..self.clone()
        }
    }

    /// Sends raw bytes.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Reply {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let res = req.body(body).send().await.expect("request failed");
        let status = res.status();
        let content_type = res
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let bytes = res.bytes().await.expect("reading the body failed");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Reply {
            status,
            content_type,
            body,
        }
    }

    /// Sends a JSON body (or none).
    pub async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Reply {
        match body {
            Some(b) => {
                self.raw(
                    method,
                    path,
                    Some("application/json"),
                    serde_json::to_vec(b).unwrap(),
                )
                .await
            }
            None => self.raw(method, path, None, Vec::new()).await,
        }
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.call(Method::GET, path, None).await
    }
    pub async fn post(&self, path: &str, body: Value) -> Reply {
        self.call(Method::POST, path, Some(&body)).await
    }
    pub async fn put(&self, path: &str, body: Value) -> Reply {
        self.call(Method::PUT, path, Some(&body)).await
    }
    pub async fn patch(&self, path: &str, body: Value) -> Reply {
        self.call(Method::PATCH, path, Some(&body)).await
    }
    pub async fn delete(&self, path: &str) -> Reply {
        self.call(Method::DELETE, path, None).await
    }

    /// Creates a tenant.
    pub async fn tenant(&self, id: &str) {
        self.post("/tenants", json!({ "id": id })).await.expect(201);
    }

    /// Creates a token and returns its secret.
    pub async fn token(&self, role: &str, tenant: Option<&str>) -> String {
        let body = self
            .post(
                "/tokens",
                json!({ "name": format!("{role} test"), "role": role, "tenant": tenant }),
            )
            .await
            .expect(201);
        body["secret"].as_str().unwrap().to_string()
    }

    /// Creates a device.
    pub async fn device(&self, tenant: &str, spec: Value) -> Value {
        self.post(&format!("/tenants/{tenant}/devices"), spec)
            .await
            .expect(201)
    }

    /// Every device of a listing, walking all pages.
    pub async fn all_devices(&self, tenant: &str, query: &str, limit: u32) -> Vec<Value> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        let mut pages = 0;
        loop {
            let mut q = format!("{query}&limit={limit}");
            if let Some(c) = &cursor {
                q.push_str(&format!("&cursor={c}"));
            }
            let page = self
                .get(&format!("/tenants/{tenant}/devices?{q}"))
                .await
                .expect(200);
            let items = page["items"].as_array().unwrap();
            assert!(items.len() <= limit as usize);
            out.extend(items.iter().cloned());
            pages += 1;
            assert!(pages < 100_000, "pagination does not end");
            match page["next_cursor"].as_str() {
                Some(c) => {
                    assert!(!items.is_empty(), "an empty page with a next cursor");
                    cursor = Some(c.to_string())
                }
                None => break,
            }
        }
        out
    }
}

/// Polls `GET path` every 50 ms until `done` holds for the answer (which must be 200), and
/// returns that answer; panics after 10 s, naming the path and the last answer.
pub async fn wait_for(api: &Api, path: &str, done: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    for _ in 0..200 {
        last = api.get(path).await.expect(200);
        if done(&last) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{path} did not reach the expected state; the last answer was {last}");
}

/// The ids of devices.
pub fn ids(devices: &[Value]) -> Vec<String> {
    devices
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_string())
        .collect()
}
