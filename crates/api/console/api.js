// The console's client of the /api/v1 operator API: the bearer token from sessionStorage, the
// API's JSON errors as ApiError, and Server-Sent Events over fetch (EventSource cannot send an
// Authorization header).

const TOKEN_KEY = 'ferrohub.token';
const TENANT_KEY = 'ferrohub.tenant';

export class ApiError extends Error {
  constructor(status, code, message, detail = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.detail = detail; // the whole JSON error (e.g. invalid_rule's line, column, hint)
  }
}

export const session = {
  get token() { return sessionStorage.getItem(TOKEN_KEY); },
  set token(t) { t ? sessionStorage.setItem(TOKEN_KEY, t) : sessionStorage.removeItem(TOKEN_KEY); },
  get tenant() { return sessionStorage.getItem(TENANT_KEY); },
  set tenant(t) { t ? sessionStorage.setItem(TENANT_KEY, t) : sessionStorage.removeItem(TENANT_KEY); },
  clear() { sessionStorage.removeItem(TOKEN_KEY); sessionStorage.removeItem(TENANT_KEY); },
};

// Called when the API answers 401: the token expired or was revoked.
let onUnauthenticated = () => {};
export function setUnauthenticatedHandler(f) { onUnauthenticated = f; }

export function path(strings, ...values) {
  return strings.reduce((out, s, i) => out + s + (i < values.length ? encodeURIComponent(values[i]) : ''), '');
}

async function errorOf(res) {
  let code = 'http_' + res.status, message = res.statusText || 'request failed', body = null;
  try {
    body = await res.json();
    code = body.code || code;
    message = body.message || message;
  } catch { /* not the API's JSON error */ }
  return new ApiError(res.status, code, message, body);
}

// Calls the API; resolves to {body, headers} or throws ApiError (status 0: network failure).
export async function call(method, url, { body, headers = {}, token = session.token, signal } = {}) {
  const h = { ...headers };
  if (token) h.Authorization = 'Bearer ' + token;
  let payload;
  if (body !== undefined) {
    h['Content-Type'] = 'application/json';
    payload = typeof body === 'string' ? body : JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch('/api/v1' + url, { method, headers: h, body: payload, signal });
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new ApiError(0, 'network', 'The hub could not be reached: ' + e.message);
  }
  if (!res.ok) {
    const err = await errorOf(res);
    if (res.status === 401 && token === session.token) onUnauthenticated(err);
    throw err;
  }
  const text = await res.text();
  return { body: text ? JSON.parse(text) : null, headers: res.headers, status: res.status };
}

export const get = (url, opts) => call('GET', url, opts).then(r => r.body);

// Reads a Server-Sent Events stream, calling onEvent(name, data) per event, until signal aborts.
// Reconnects after a pause when the stream ends or fails (the hub restarted, the network blinked).
export async function stream(url, onEvent, { signal, onState = () => {} } = {}) {
  while (!signal.aborted) {
    try {
      const res = await fetch('/api/v1' + url, {
        headers: { Authorization: 'Bearer ' + session.token, Accept: 'text/event-stream' },
        signal,
      });
      if (!res.ok) {
        const err = await errorOf(res);
        if (res.status === 401) { onUnauthenticated(err); return; }
        throw err;
      }
      onState('live');
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf('\n\n')) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          let name = 'message';
          const data = [];
          for (const line of block.split('\n')) {
            if (line.startsWith('event:')) name = line.slice(6).trim();
            else if (line.startsWith('data:')) data.push(line.slice(5).replace(/^ /, ''));
          }
          if (data.length) onEvent(name, data.join('\n'));
        }
      }
    } catch (e) {
      if (signal.aborted) return;
      onState('error', e);
    }
    if (signal.aborted) return;
    onState('reconnecting');
    await new Promise(r => setTimeout(r, 3000));
  }
}
