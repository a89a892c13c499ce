// The chat page: conversation list, messages, composer, per-conversation settings.
// Everything the model sends is rendered through markdown.js (text nodes only).

import { ApiError, apiKey, events, explain, listModels, request } from './api.js';
import { codeBlock, copyText, renderMarkdown } from './markdown.js';
import * as store from './store.js';

const $ = (id) => document.getElementById(id);
const state = { convs: [], cur: null, models: [], busy: null, retryAfterKey: null };
let liveTimer = null;

function conv() {
  return state.convs.find((c) => c.id === state.cur);
}

function save() {
  try {
    store.saveAll(state.convs);
  } catch (e) {
    status(`Could not save the conversations in this browser: ${e.message}`, true);
  }
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function button(label, cls, onClick, title) {
  const b = el('button', cls, label);
  b.type = 'button';
  if (title) b.title = title;
  b.addEventListener('click', onClick);
  return b;
}

let statusTimer = null;
function status(text, isError = false, sticky = false) {
  const s = $('status');
  clearTimeout(statusTimer);
  s.hidden = !text;
  s.textContent = text || '';
  s.classList.toggle('error', isError);
  if (text && !sticky && !isError) statusTimer = setTimeout(() => { s.hidden = true; }, 4000);
}

// ---- conversation list -------------------------------------------------------------------

function renderList() {
  const ul = $('conversations');
  ul.replaceChildren();
  for (const c of [...state.convs].sort((a, b) => b.updated - a.updated)) {
    const li = el('li', `conv${c.id === state.cur ? ' active' : ''}`);
    li.dataset.id = c.id;
    const open = button(c.title, 'conv-title', () => select(c.id));
    const rename = button('✎', 'icon rename', () => renameConv(c), 'Rename');
    const del = button('×', 'icon delete', () => deleteConv(c), 'Delete');
    li.append(open, rename, del);
    ul.append(li);
  }
}

function select(id) {
  state.cur = id;
  store.current.set(id);
  document.body.classList.remove('show-side');
  $('scrim').hidden = true;
  renderAll();
}

function newConv() {
  const busyConv = state.busy && state.busy.conv;
  const c = conv();
  if (c && c.messages.length === 0 && c !== busyConv) { select(c.id); $('input').focus(); return; }
  const fresh = store.create(c ? c.settings : store.defaults());
  state.convs.push(fresh);
  save();
  select(fresh.id);
  $('input').focus();
}

function renameConv(c) {
  const name = window.prompt('Rename conversation', c.title);
  if (name === null || !name.trim()) return;
  c.title = name.trim().slice(0, 200);
  save();
  renderAll();
}

function deleteConv(c) {
  if (!window.confirm(`Delete “${c.title}”?`)) return;
  if (state.busy && state.busy.conv === c) state.busy.controller.abort();
  state.convs = state.convs.filter((x) => x !== c);
  if (!state.convs.length) state.convs.push(store.create());
  save();
  select(state.cur === c.id ? [...state.convs].sort((a, b) => b.updated - a.updated)[0].id : state.cur);
}

// ---- messages ------------------------------------------------------------------------------

function pretty(text) {
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch {
    return null;
  }
}

function splitThink(content) {
  // models that write their reasoning inline: <think>...</think> answer
  const t = content.match(/^\s*<think>/);
  if (!t) return [null, content];
  const end = content.indexOf('</think>');
  if (end < 0) return [content.slice(t[0].length), ''];
  return [content.slice(t[0].length, end), content.slice(end + 8).replace(/^\s+/, '')];
}

function statsLine(m) {
  const s = m.stats;
  if (!s) return null;
  const parts = [];
  if (s.tokens) parts.push(`${s.tokens} tokens`);
  if (s.tps) parts.push(`${s.tps.toFixed(1)} tok/s`);
  if (s.ttft_ms != null) parts.push(`TTFT ${s.ttft_ms} ms`);
  if (s.stopped) parts.push('stopped');
  if (m.finish_reason === 'length') parts.push('cut at max tokens');
  return parts.length ? el('div', 'stats', parts.join(' · ')) : null;
}

function toolCallNode(tc) {
  const d = el('details', 'tool-call');
  const fn = tc.function || {};
  d.append(el('summary', null, `Tool call: ${fn.name || '(unnamed)'}`));
  const args = typeof fn.arguments === 'string' ? fn.arguments : JSON.stringify(fn.arguments ?? {});
  d.append(codeBlock(pretty(args) ?? args, 'json'));
  return d;
}

function messageNode(c, m, i) {
  const live = state.busy && state.busy.msg === m;
  const node = el('div', `msg ${m.role}${live ? ' live' : ''}`);
  node.dataset.index = i;
  const lastUser = c.messages.findLastIndex((x) => x.role === 'user');
  const idle = !state.busy;

  if (m.role === 'user') {
    node.append(el('div', 'bubble', m.content));
    if (i === lastUser && idle) {
      const actions = el('div', 'actions');
      actions.append(button('Edit', 'edit', () => editLast(c, node, i)));
      // no answer yet (an import, a deleted answer): ask for one
      if (i === c.messages.length - 1) actions.append(button('Answer', 'regenerate', () => regenerate(c)));
      node.append(actions);
    }
    return node;
  }
  if (m.role === 'tool') {
    const d = el('details', 'tool-result');
    d.append(el('summary', null, `Tool result${m.name ? `: ${m.name}` : ''}${m.tool_call_id ? ` (${m.tool_call_id})` : ''}`));
    d.append(codeBlock(pretty(m.content) ?? m.content, pretty(m.content) ? 'json' : 'text'));
    node.append(d);
    return node;
  }
  if (m.role !== 'assistant') return node;

  let [thought, content] = splitThink(m.content || '');
  if (m.reasoning_content) thought = m.reasoning_content + (thought ? `\n${thought}` : '');
  if (thought) {
    const d = el('details', 'reasoning');
    d.append(el('summary', null, live && !content ? 'Reasoning…' : 'Reasoning'));
    const body = el('div', 'reasoning-body');
    body.append(renderMarkdown(thought));
    d.append(body);
    node.append(d);
  }
  const body = el('div', 'content');
  const json = m.format && !live ? pretty(content) : null;
  if (json !== null) body.append(codeBlock(json, 'json'));
  else if (content) body.append(renderMarkdown(content));
  else if (live && !thought && !(m.tool_calls || []).length) body.append(el('span', 'typing', '…'));
  node.append(body);
  for (const tc of m.tool_calls || []) node.append(toolCallNode(tc));
  if (m.error) node.append(el('div', 'error', m.error));
  const stats = statsLine(m);
  if (stats) node.append(stats);
  if (!live) {
    const actions = el('div', 'actions');
    if (m.content) actions.append(button('Copy', 'copy-msg', async (ev) => {
      ev.target.textContent = (await copyText(m.content)) ? 'Copied' : 'Copy failed';
    }));
    if (idle && i === c.messages.length - 1 && lastUser >= 0) actions.append(button('Regenerate', 'regenerate', () => regenerate(c)));
    node.append(actions);
  }
  return node;
}

function nearBottom() {
  const box = $('messages');
  return box.scrollHeight - box.scrollTop - box.clientHeight < 80;
}

function renderMessages() {
  const c = conv();
  const box = $('messages');
  box.replaceChildren();
  if (!c.messages.length) {
    const hello = el('div', 'empty');
    const model = c.settings.model || (state.models[0] && state.models[0].id) || 'the model';
    hello.append(el('h2', null, 'Chat with ' + model), el('p', null, 'Enter sends, Shift+Enter adds a line, Esc stops the answer.'));
    box.append(hello);
    return;
  }
  c.messages.forEach((m, i) => box.append(messageNode(c, m, i)));
  box.scrollTop = box.scrollHeight;
}

function renderLive() {
  liveTimer = null;
  const b = state.busy;
  if (!b || b.conv.id !== state.cur) return;
  const i = b.conv.messages.indexOf(b.msg);
  const old = $('messages').querySelector(`.msg[data-index="${i}"]`);
  if (!old) return;
  const follow = nearBottom();
  old.replaceWith(messageNode(b.conv, b.msg, i));
  if (follow) $('messages').scrollTop = $('messages').scrollHeight;
}

function scheduleLive() {
  if (liveTimer === null) liveTimer = setTimeout(renderLive, 40);
}

function editLast(c, node, i) {
  const m = c.messages[i];
  const ta = el('textarea', 'edit-box');
  ta.value = m.content;
  const saveBtn = button('Save & send', 'save-edit', () => {
    if (!ta.value.trim()) return;
    m.content = ta.value;
    c.messages.length = i + 1;
    generate(c);
  });
  const cancel = button('Cancel', 'cancel-edit', () => renderMessages());
  ta.addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); saveBtn.click(); }
    if (ev.key === 'Escape') { ev.stopPropagation(); cancel.click(); }
  });
  const actions = el('div', 'actions');
  actions.append(cancel, saveBtn);
  node.replaceChildren(ta, actions);
  ta.focus();
}

// ---- settings ----------------------------------------------------------------------------

const NUMBER_FIELDS = ['temperature', 'top_p', 'max_tokens'];

function renderModels() {
  const sel = $('model');
  const c = conv();
  sel.replaceChildren();
  const ids = state.models.map((m) => m.id);
  // many models: say which are not resident yet (they load on the first message) or failed
  for (const m of state.models) {
    const st = m.status && m.status.value;
    sel.append(new Option(st && st !== 'loaded' ? `${m.id} (${st})` : m.id, m.id));
  }
  if (c.settings.model && !ids.includes(c.settings.model)) sel.append(new Option(`${c.settings.model} (not served)`, c.settings.model));
  if (!sel.options.length) sel.append(new Option('(no model)', ''));
  sel.value = c.settings.model || ids[0] || '';
}

function renderSettings() {
  const s = conv().settings;
  renderModels();
  $('system').value = s.system || '';
  for (const k of NUMBER_FIELDS) $(k).value = s[k] ?? '';
  $('response_format').value = s.response_format || '';
}

function readSettings() {
  const c = conv();
  const s = c.settings;
  s.model = $('model').value;
  s.system = $('system').value;
  for (const k of NUMBER_FIELDS) {
    const v = $(k).value.trim();
    s[k] = v === '' || !Number.isFinite(Number(v)) ? null : Number(v);
  }
  s.response_format = $('response_format').value;
  store.rememberDefaults(s);
  save();
  renderModels();
}

function renderAll() {
  if (!conv()) state.cur = [...state.convs].sort((a, b) => b.updated - a.updated)[0].id;
  const c = conv();
  $('title').textContent = c.title;
  document.title = `${c.title} · llamatron`;
  renderList();
  renderSettings();
  renderMessages();
  setBusy(!!state.busy);
}

// ---- generation ----------------------------------------------------------------------------

function requestBody(c, placeholder) {
  const s = c.settings;
  const messages = [];
  if (s.system && s.system.trim()) messages.push({ role: 'system', content: s.system });
  for (const m of c.messages) {
    if (m === placeholder) continue;
    if (m.role === 'assistant' && !m.content && !(m.tool_calls || []).length) continue; // failed or stopped early
    const o = { role: m.role, content: m.content };
    if (m.tool_calls) o.tool_calls = m.tool_calls;
    if (m.tool_call_id) o.tool_call_id = m.tool_call_id;
    if (m.role === 'tool' && m.name) o.name = m.name;
    messages.push(o);
  }
  const body = { messages, stream: true, stream_options: { include_usage: true } };
  const model = s.model || (state.models[0] && state.models[0].id);
  if (model) body.model = model;
  if (s.temperature != null) body.temperature = s.temperature;
  if (s.top_p != null) body.top_p = s.top_p;
  if (s.max_tokens != null && s.max_tokens > 0) body.max_tokens = Math.floor(s.max_tokens);
  if (s.response_format) body.response_format = { type: s.response_format };
  if (c.tools) body.tools = c.tools;
  return body;
}

function mergeToolCalls(msg, deltas) {
  msg.tool_calls = msg.tool_calls || [];
  for (const d of deltas) {
    const i = d.index ?? msg.tool_calls.length;
    const tc = msg.tool_calls[i] || (msg.tool_calls[i] = { id: '', type: 'function', function: { name: '', arguments: '' } });
    if (d.id) tc.id = d.id;
    if (d.function?.name) tc.function.name += d.function.name;
    if (d.function?.arguments) tc.function.arguments += d.function.arguments;
  }
}

async function generate(c) {
  if (state.busy) return;
  const msg = { role: 'assistant', content: '' };
  if (c.settings.response_format) msg.format = c.settings.response_format;
  c.messages.push(msg);
  c.updated = Date.now();
  const controller = new AbortController();
  state.busy = { conv: c, controller, msg };
  save();
  renderAll();
  const t0 = performance.now();
  let tFirst = null;
  let tLast = null;
  let chunks = 0;
  let usage = null;
  let stopped = false;
  try {
    const res = await request('/v1/chat/completions', { method: 'POST', body: requestBody(c, msg), signal: controller.signal });
    for await (const ev of events(res)) {
      if (ev.usage) usage = ev.usage;
      const ch = ev.choices && ev.choices[0];
      if (!ch) continue;
      const d = ch.delta || {};
      let got = false;
      if (d.content) { msg.content += d.content; got = true; }
      if (d.reasoning_content) { msg.reasoning_content = (msg.reasoning_content || '') + d.reasoning_content; got = true; }
      if (d.tool_calls) { mergeToolCalls(msg, d.tool_calls); got = true; }
      if (ch.finish_reason) msg.finish_reason = ch.finish_reason;
      if (got) {
        chunks++;
        tLast = performance.now();
        if (tFirst === null) tFirst = tLast;
        scheduleLive();
      }
    }
  } catch (e) {
    if (e.name === 'AbortError') stopped = true;
    else {
      msg.error = explain(e);
      if (e instanceof ApiError && e.status === 401) {
        state.retryAfterKey = c.id;
        setTimeout(() => askKey(apiKey.get() ? 'The server refused this API key.' : undefined), 0);
      }
    }
  } finally {
    clearTimeout(liveTimer);
    liveTimer = null;
    const tokens = (usage && usage.completion_tokens) || chunks;
    if (tFirst !== null || stopped) {
      msg.stats = {
        tokens,
        ttft_ms: tFirst === null ? null : Math.round(tFirst - t0),
        tps: tokens > 1 && tLast > tFirst ? (tokens - 1) / ((tLast - tFirst) / 1000) : null,
        stopped,
      };
    }
    state.busy = null;
    c.updated = Date.now();
    save();
    renderAll();
  }
}

function regenerate(c) {
  if (state.busy) return;
  const last = c.messages.findLastIndex((m) => m.role === 'user');
  if (last < 0) return;
  c.messages.length = last + 1;
  generate(c);
}

function send() {
  const input = $('input');
  const text = input.value;
  if (!text.trim() || state.busy) return;
  const c = conv();
  c.messages.push({ role: 'user', content: text });
  if (c.title === 'New chat') c.title = text.trim().split('\n')[0].slice(0, 60);
  input.value = '';
  autosize();
  generate(c);
}

function stop() {
  if (state.busy) state.busy.controller.abort();
}

function setBusy(busy) {
  $('send').hidden = busy;
  $('stop').hidden = !busy;
  document.body.classList.toggle('busy', busy);
}

// ---- API key and start-up ------------------------------------------------------------------

let keyWaiters = [];
function askKey(reason) {
  const dlg = $('key-dialog');
  $('key-reason').textContent = reason || 'This server needs an API key. It is kept in this browser only.';
  $('key-input').value = apiKey.get();
  if (!dlg.open) dlg.showModal();
  $('key-input').focus();
  return new Promise((resolve) => keyWaiters.push(resolve));
}

function keyDone(saved) {
  $('key-dialog').close();
  const waiters = keyWaiters;
  keyWaiters = [];
  waiters.forEach((w) => w(saved));
  if (!saved) return;
  loadModels();
  const retry = state.retryAfterKey && state.convs.find((c) => c.id === state.retryAfterKey);
  state.retryAfterKey = null;
  if (retry && retry.id === state.cur) regenerate(retry);
}

async function waitReady() {
  for (let shown = false; ;) {
    try {
      const res = await fetch('/health');
      if (res.ok) break;
      const body = await res.json().catch(() => ({}));
      if (body.error && body.error.code === 'model_load_failed') { status(body.error.message, true); return false; }
    } catch {
      /* server not answering yet */
    }
    if (!shown) { status('Loading the model…', false, true); shown = true; }
    await new Promise((r) => setTimeout(r, 1000));
  }
  status('');
  return true;
}

async function loadModels() {
  try {
    state.models = await listModels();
    renderSettings();
    if (!conv().messages.length) renderMessages();
    return true;
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) {
      askKey(apiKey.get() ? 'The server refused the saved API key. Enter the right one.' : undefined);
    } else status(explain(e), true);
    return false;
  }
}

function autosize() {
  const ta = $('input');
  ta.style.height = 'auto';
  ta.style.height = `${Math.min(ta.scrollHeight, 220)}px`;
  ta.style.overflowY = ta.scrollHeight > 220 ? 'auto' : 'hidden';
}

function download(name, text) {
  const url = URL.createObjectURL(new Blob([text], { type: 'application/json' }));
  const a = el('a');
  a.href = url;
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

async function importFile(file) {
  try {
    const imported = store.parseImport(await file.text());
    const ids = new Set(state.convs.map((c) => c.id));
    for (const c of imported) {
      if (ids.has(c.id)) c.id = store.newId();
      ids.add(c.id);
      state.convs.push(c);
    }
    save();
    select(imported[0].id);
    status(`Imported ${imported.length} conversation${imported.length === 1 ? '' : 's'}.`);
  } catch (e) {
    status(`Could not import ${file.name}: ${e.message}`, true);
  }
}

function wire() {
  $('composer').addEventListener('submit', (ev) => { ev.preventDefault(); send(); });
  $('input').addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); send(); }
  });
  $('input').addEventListener('input', autosize);
  $('stop').addEventListener('click', stop);
  document.addEventListener('keydown', (ev) => {
    if (ev.key === 'Escape' && state.busy && !$('key-dialog').open) { ev.preventDefault(); stop(); }
  });
  $('new-chat').addEventListener('click', newConv);
  $('settings').addEventListener('submit', (ev) => ev.preventDefault());
  $('settings').addEventListener('change', readSettings);
  $('settings-toggle').addEventListener('click', () => {
    const open = $('settings').hidden;
    $('settings').hidden = !open;
    $('settings-toggle').setAttribute('aria-expanded', String(open));
  });
  $('change-key').addEventListener('click', () => askKey('API key for this server (kept in this browser only; empty to forget it).'));
  $('key-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    apiKey.set($('key-input').value.trim());
    keyDone(true);
  });
  $('key-input').required = false;
  $('key-cancel').addEventListener('click', () => keyDone(false));
  $('key-dialog').addEventListener('cancel', () => keyDone(false));
  $('export').addEventListener('click', () => {
    download(`llamatron-chats-${new Date().toISOString().slice(0, 10)}.json`, store.exportJSON(state.convs));
  });
  $('import').addEventListener('click', () => $('import-file').click());
  $('import-file').addEventListener('change', (ev) => {
    const f = ev.target.files[0];
    ev.target.value = '';
    if (f) importFile(f);
  });
  const toggleSide = () => {
    const show = !document.body.classList.contains('show-side');
    document.body.classList.toggle('show-side', show);
    $('scrim').hidden = !show;
  };
  $('menu').addEventListener('click', toggleSide);
  $('scrim').addEventListener('click', toggleSide);
  window.addEventListener('storage', (ev) => { // another tab changed the conversations
    if (ev.key === 'llamatron.conversations' && !state.busy) {
      state.convs = store.loadAll();
      if (!state.convs.length) state.convs.push(store.create());
      renderAll();
    }
  });
}

async function main() {
  state.convs = store.loadAll();
  if (!state.convs.length) state.convs.push(store.create());
  const saved = store.current.get();
  state.cur = state.convs.some((c) => c.id === saved) ? saved : [...state.convs].sort((a, b) => b.updated - a.updated)[0].id;
  wire();
  renderAll();
  $('input').focus();
  if (await waitReady()) {
    await loadModels();
    document.body.dataset.ready = '1';
  }
}

main();
