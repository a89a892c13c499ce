// A small Markdown renderer that builds DOM nodes. Model text only ever becomes text nodes
// (textContent), never markup: HTML in an answer shows as the characters it is made of.
// Covers what chat models write: fenced code, headings, lists, quotes, tables, rules, paragraphs,
// `code`, **bold**, *italic*, ~~strike~~, [links](https://...) and bare URLs (http, https, mailto).

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^\s`]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}> ?/;
const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
const TABLE_SEP = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function startsBlock(line, next) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line)
    || (line.includes('|') && next !== undefined && TABLE_SEP.test(next) && next.includes('-'));
}

export async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    // plain http on another host is not a secure context: no clipboard API there
    const ta = el('textarea');
    ta.value = text;
    ta.style.position = 'fixed';
    ta.style.opacity = '0';
    document.body.append(ta);
    ta.select();
    const ok = document.execCommand('copy');
    ta.remove();
    return ok;
  }
}

export function codeBlock(text, lang) {
  const box = el('div', 'code');
  const head = el('div', 'code-head');
  const copy = el('button', 'copy', 'Copy');
  copy.type = 'button';
  copy.addEventListener('click', async () => {
    copy.textContent = (await copyText(text)) ? 'Copied' : 'Copy failed';
    setTimeout(() => { copy.textContent = 'Copy'; }, 1500);
  });
  head.append(el('span', 'lang', lang || 'text'), copy);
  const pre = el('pre');
  pre.append(el('code', null, text));
  box.append(head, pre);
  return box;
}

function safeHref(url) {
  return /^(https?:\/\/|mailto:)/i.test(url) ? url : null;
}

function link(text, url) {
  const href = safeHref(url);
  if (!href) return null;
  const a = el('a');
  a.href = href;
  a.target = '_blank';
  a.rel = 'noopener noreferrer nofollow';
  a.append(...inline(text));
  return a;
}

const INLINE = new RegExp([
  /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/.source, // 1,2 code span
  /\[([^\]\n]+)\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"\n]*")?\s*\)/.source, // 3,4 link
  /(https?:\/\/[^\s<>()\[\]]*[^\s<>()\[\].,;:!?'"*_~])/.source, // 5 bare URL
  /\*\*(?=\S)([\s\S]*?\S)\*\*/.source, // 6 bold
  /(?<![\w])__(?=\S)([\s\S]*?\S)__(?![\w])/.source, // 7 bold
  /~~(?=\S)([\s\S]*?\S)~~/.source, // 8 strike
  /\*(?=[^\s*])([\s\S]*?[^\s*])\*/.source, // 9 italic
  /(?<![\w])_(?=[^\s_])([\s\S]*?[^\s_])_(?![\w])/.source, // 10 italic
  /(\n)/.source, // 11 line break
].join('|'), 'g');

export function inline(text) {
  const out = [];
  let last = 0;
  const re = new RegExp(INLINE); // own lastIndex: the calls below recurse
  for (let m; (m = re.exec(text)) !== null;) {
    if (m.index > last) out.push(document.createTextNode(text.slice(last, m.index)));
    last = re.lastIndex;
    let node = null;
    if (m[2] !== undefined) node = el('code', null, m[2].length > 2 && m[2][0] === ' ' && m[2].at(-1) === ' ' ? m[2].slice(1, -1) : m[2]);
    else if (m[3] !== undefined) node = link(m[3], m[4]);
    else if (m[5] !== undefined) node = link(m[5], m[5]);
    else if (m[6] !== undefined || m[7] !== undefined) { node = el('strong'); node.append(...inline(m[6] ?? m[7])); }
    else if (m[8] !== undefined) { node = el('del'); node.append(...inline(m[8])); }
    else if (m[9] !== undefined || m[10] !== undefined) { node = el('em'); node.append(...inline(m[9] ?? m[10])); }
    else if (m[11] !== undefined) node = el('br');
    out.push(node ?? document.createTextNode(m[0]));
  }
  if (last < text.length) out.push(document.createTextNode(text.slice(last)));
  return out;
}

function cells(row) {
  let r = row.trim();
  if (r.startsWith('|')) r = r.slice(1);
  if (r.endsWith('|') && !r.endsWith('\\|')) r = r.slice(0, -1);
  return r.split(/(?<!\\)\|/).map((c) => c.trim().replace(/\\\|/g, '|'));
}

function table(lines) {
  const wrap = el('div', 'table');
  const t = el('table');
  const align = cells(lines[1]).map((c) => (c.endsWith(':') ? (c.startsWith(':') ? 'center' : 'right') : ''));
  const addRow = (parent, row, tag) => {
    const tr = el('tr');
    cells(row).forEach((c, i) => {
      const td = el(tag);
      if (align[i]) td.style.textAlign = align[i];
      td.append(...inline(c));
      tr.append(td);
    });
    parent.append(tr);
  };
  const thead = el('thead');
  addRow(thead, lines[0], 'th');
  const tbody = el('tbody');
  lines.slice(2).forEach((r) => addRow(tbody, r, 'td'));
  t.append(thead, tbody);
  wrap.append(t);
  return wrap;
}

function list(lines, i) {
  // consecutive items of the first item's kind at its indent; deeper lines belong to the item above
  const first = ITEM.exec(lines[i]);
  const indent = first[1].length;
  const ordered = /\d/.test(first[2]);
  const root = el(ordered ? 'ol' : 'ul');
  if (ordered && parseInt(first[2], 10) !== 1) root.start = parseInt(first[2], 10);
  let item = null;
  let loose = false;
  for (; i < lines.length; i++) {
    const line = lines[i];
    const m = ITEM.exec(line);
    if (m && m[1].length <= indent + 1 && /\d/.test(m[2]) === ordered) {
      item = [m[3]];
      root._items = root._items || [];
      root._items.push(item);
      continue;
    }
    if (line.trim() === '') {
      const next = lines[i + 1];
      if (next !== undefined && (/^\s/.test(next) && next.trim() !== '') ) { item.push(''); loose = true; continue; }
      if (next !== undefined && ITEM.test(next) && ITEM.exec(next)[1].length <= indent + 1) { loose = true; continue; }
      break;
    }
    if (m || /^\s/.test(line)) { item.push(line.replace(new RegExp(`^\\s{0,${indent + 4}}`), '')); continue; }
    if (startsBlock(line, lines[i + 1])) break;
    item.push(line); // lazy continuation
  }
  for (const it of root._items) {
    const li = el('li');
    const inner = blocks(it);
    if (!loose && inner.childNodes.length >= 1 && inner.firstChild.tagName === 'P') {
      const p = inner.firstChild;
      li.append(...p.childNodes);
      p.remove();
    }
    li.append(inner);
    root.append(li);
  }
  delete root._items;
  return [root, i];
}

function blocks(lines) {
  const frag = document.createDocumentFragment();
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (line.trim() === '') { i++; continue; }
    if ((m = FENCE.exec(line))) {
      const fence = m[1];
      const body = [];
      for (i++; i < lines.length; i++) {
        const close = lines[i].trim();
        if (close.startsWith(fence[0].repeat(fence.length)) && /^[`~]+$/.test(close)) { i++; break; }
        body.push(lines[i]);
      }
      frag.append(codeBlock(body.join('\n'), m[2]));
      continue;
    }
    if ((m = HEADING.exec(line))) {
      const h = el(`h${Math.min(6, m[1].length + 2)}`);
      h.append(...inline(m[2]));
      frag.append(h);
      i++;
      continue;
    }
    if (RULE.test(line)) { frag.append(el('hr')); i++; continue; }
    if (QUOTE.test(line)) {
      const body = [];
      while (i < lines.length && lines[i].trim() !== '' && (QUOTE.test(lines[i]) || !startsBlock(lines[i]))) {
        body.push(lines[i].replace(QUOTE, ''));
        i++;
      }
      const q = el('blockquote');
      q.append(blocks(body));
      frag.append(q);
      continue;
    }
    if (ITEM.test(line)) {
      const [node, next] = list(lines, i);
      frag.append(node);
      i = next;
      continue;
    }
    if (line.includes('|') && i + 1 < lines.length && TABLE_SEP.test(lines[i + 1]) && lines[i + 1].includes('-')) {
      const rows = [line, lines[i + 1]];
      for (i += 2; i < lines.length && lines[i].includes('|') && lines[i].trim() !== ''; i++) rows.push(lines[i]);
      frag.append(table(rows));
      continue;
    }
    const para = [line];
    for (i++; i < lines.length && lines[i].trim() !== '' && !startsBlock(lines[i], lines[i + 1]); i++) para.push(lines[i]);
    const p = el('p');
    p.append(...inline(para.join('\n')));
    frag.append(p);
  }
  return frag;
}

export function renderMarkdown(text) {
  return blocks(String(text).replace(/\r\n?/g, '\n').split('\n'));
}
