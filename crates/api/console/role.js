// What the signed-in token may do: its role and tenant scope from GET /api/v1/me. Views disable
// (with a tooltip naming the role needed) the actions the API would refuse with 403.

const ORDER = ['viewer', 'operator', 'admin'];
let me = null;

export function setMe(m) { me = m; }
export function currentMe() { return me; }

// Whether the token has at least `role`. Unknown (an older hub without /me): allowed, and the
// API still refuses what the token may not do.
export function can(role) {
  return !me || ORDER.indexOf(me.role) >= ORDER.indexOf(role);
}

export function needsText(role) {
  return `Needs the ${role} role; this token is a ${me ? me.role : 'unknown'} token.`;
}

// Disables `el` (a button, input or textarea) unless the token has `role`; returns `el`.
export function gate(el, role) {
  if (can(role)) return el;
  if ('readOnly' in el && el.tagName === 'TEXTAREA') el.readOnly = true;
  else el.disabled = true;
  el.title = needsText(role);
  el.dataset.needsRole = role;
  return el;
}
