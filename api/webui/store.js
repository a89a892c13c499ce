// Conversations kept in this browser's localStorage, and their JSON export/import.
//
// A conversation: {id, title, created, updated, settings, messages, tools?}; a message is an
// OpenAI chat message ({role, content, tool_calls?, tool_call_id?, name?}) plus what the page
// adds: reasoning_content, stats {tokens, ttft_ms, tps, stopped}, error, format.

const LIST = 'llamatron.conversations';
const CURRENT = 'llamatron.current';
const DEFAULTS = 'llamatron.defaults';

export const BASE_SETTINGS = { model: '', system: '', temperature: 0.7, top_p: 0.95, max_tokens: null, response_format: '' };

function read(key, fallback) {
  try {
    const v = JSON.parse(localStorage.getItem(key));
    return v ?? fallback;
  } catch {
    return fallback;
  }
}

export function newId() {
  return Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
}

export function loadAll() {
  const list = read(LIST, []);
  return Array.isArray(list) ? list.map(normalize).filter(Boolean) : [];
}

export function saveAll(list) {
  localStorage.setItem(LIST, JSON.stringify(list));
}

export const current = {
  get: () => localStorage.getItem(CURRENT),
  set: (id) => localStorage.setItem(CURRENT, id),
};

export function defaults() {
  return { ...BASE_SETTINGS, ...read(DEFAULTS, {}) };
}

export function rememberDefaults(settings) {
  localStorage.setItem(DEFAULTS, JSON.stringify(settings));
}

export function create(settings = defaults()) {
  const now = Date.now();
  return { id: newId(), title: 'New chat', created: now, updated: now, settings: { ...settings }, messages: [] };
}

function text(content) {
  if (typeof content === 'string') return content;
  if (Array.isArray(content)) return content.map((p) => (typeof p === 'string' ? p : p?.text ?? '')).join('');
  return content == null ? '' : JSON.stringify(content);
}

const ROLES = new Set(['system', 'user', 'assistant', 'tool']);

// Anything imported or read back is reshaped into what the page expects (or dropped).
export function normalize(c) {
  if (!c || typeof c !== 'object' || !Array.isArray(c.messages)) return null;
  const settings = { ...BASE_SETTINGS };
  for (const k of Object.keys(BASE_SETTINGS)) if (c.settings && c.settings[k] !== undefined) settings[k] = c.settings[k];
  const messages = [];
  for (const m of c.messages) {
    if (!m || !ROLES.has(m.role)) continue;
    if (m.role === 'system') { // an exported OpenAI message list: its system message is the setting
      if (!settings.system) settings.system = text(m.content);
      continue;
    }
    const out = { role: m.role, content: text(m.content) };
    if (typeof m.reasoning_content === 'string') out.reasoning_content = m.reasoning_content;
    if (Array.isArray(m.tool_calls)) out.tool_calls = m.tool_calls;
    for (const k of ['tool_call_id', 'name', 'error', 'format']) if (typeof m[k] === 'string') out[k] = m[k];
    if (m.stats && typeof m.stats === 'object') out.stats = m.stats;
    messages.push(out);
  }
  const now = Date.now();
  return {
    id: typeof c.id === 'string' && c.id ? c.id : newId(),
    title: typeof c.title === 'string' && c.title ? c.title.slice(0, 200) : 'Imported chat',
    created: Number(c.created) || now,
    updated: Number(c.updated) || now,
    settings,
    messages,
    ...(Array.isArray(c.tools) ? { tools: c.tools } : {}),
  };
}

export function exportJSON(list) {
  return JSON.stringify({ format: 'llamatron-webui', version: 1, conversations: list }, null, 2);
}

// Accepts an export, a list of conversations, one conversation, or a bare OpenAI message list.
export function parseImport(textData) {
  const data = JSON.parse(textData);
  let items;
  if (Array.isArray(data)) items = data.length && data[0] && data[0].role ? [{ messages: data }] : data;
  else if (Array.isArray(data?.conversations)) items = data.conversations;
  else items = [data];
  const out = items.map(normalize).filter(Boolean);
  if (!out.length) throw new Error('no conversations found in that file');
  return out;
}
