// The server's HTTP API as the page uses it: JSON calls, the chat stream (SSE over fetch, so
// aborting the fetch closes the connection and the server aborts the request), and errors turned
// into sentences a person can act on.

export class ApiError extends Error {
  constructor(status, message, code = null, retryAfter = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

const KEY = 'llamatron.apiKey';
export const apiKey = {
  get: () => localStorage.getItem(KEY) || '',
  set: (k) => (k ? localStorage.setItem(KEY, k) : localStorage.removeItem(KEY)),
};

async function errorFrom(res) {
  let message = `${res.status} ${res.statusText}`;
  let code = null;
  try {
    const body = await res.json();
    const e = body.error ?? body;
    if (e && typeof e === 'object') {
      message = e.message || message;
      code = e.code || e.type || null;
    } else if (typeof e === 'string') message = e;
  } catch { /* not JSON: keep the status line */ }
  return new ApiError(res.status, message, code, res.headers.get('Retry-After'));
}

export async function request(path, { method = 'GET', body, signal } = {}) {
  const headers = {};
  const key = apiKey.get();
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let res;
  try {
    res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), signal });
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new ApiError(0, 'Cannot reach the server. Is `llamatron serve` still running?', 'network');
  }
  if (!res.ok) throw await errorFrom(res);
  return res;
}

export async function listModels() {
  const res = await request('/v1/models');
  return (await res.json()).data || [];
}

// Yields each `data:` JSON object of an SSE response until [DONE]; an in-band error is thrown.
export async function* events(res) {
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += value;
    let cut;
    while ((cut = buf.search(/\r?\n\r?\n/)) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut).replace(/^\r?\n\r?\n/, '');
      const data = block.split(/\r?\n/).filter((l) => l.startsWith('data:')).map((l) => l.slice(5).trimStart()).join('\n');
      if (!data) continue; // keep-alive comment
      if (data === '[DONE]') return;
      const ev = JSON.parse(data);
      if (ev.error) throw new ApiError(500, ev.error.message || 'The server reported an error', ev.error.code);
      yield ev;
    }
  }
}

// What to tell the person, by the server's error code and status.
export function explain(err) {
  if (!(err instanceof ApiError)) return `Error: ${err.message || err}`;
  const m = err.message;
  switch (err.code) {
    case 'context_length_exceeded':
      return `The conversation is too long for the model's context. Start a new conversation, shorten the last message or lower Max tokens. (${m})`;
    case 'overloaded':
      return `The server is busy (too many requests waiting). Try again${err.retryAfter ? ` in ${err.retryAfter} s` : ' shortly'}.`;
    case 'model_loading':
      return 'The model is still loading. Try again in a few seconds.';
    case 'shutting_down':
      return 'The server is shutting down.';
    case 'model_not_found':
      return `${m} Pick a model in Settings.`;
    case 'invalid_api_key':
      return 'The API key was refused. Enter the right key (Settings → API key).';
    default:
      break;
  }
  if (err.status === 401) return 'This server needs an API key (Settings → API key).';
  if (err.status === 503) return `The server is unavailable: ${m}`;
  if (err.status === 0) return m;
  return `Error ${err.status}: ${m}`;
}
