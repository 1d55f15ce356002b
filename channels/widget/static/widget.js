/* swarmdesk chat widget: one <script> tag, no build step.
 *
 *   <script src="https://support.example.com/widget/v1/widget.js" data-site="SITE_KEY" async
 *           data-locale="en|zh" data-colour="#2563eb" data-position="right|left"
 *           data-user-id="42" data-user-hash="HMAC-SHA256 hex" data-user-name="Ann"></script>
 *
 * Everything lives in a shadow root, so the page's styles don't reach it. Protocol: see
 * channels/widget/protocol.py. The visitor is a random token kept in localStorage; every
 * message gets a client id, so a resend after a reconnect is stored and answered once.
 */
(function () {
  'use strict';
  var script = document.currentScript;
  if (!script || window.SwarmDesk) return;
  var SRC = script.src;
  var BASE = SRC.slice(0, SRC.lastIndexOf('/')); // .../widget/v1
  var ORIGIN = new URL(SRC).origin;
  var D = script.dataset;
  var SITE = D.site || '';
  var KEY = 'swarmdesk:' + SITE + ':';

  // Each text in every language the widget speaks, side by side (LANGS order).
  var LANGS = ['en', 'zh'];
  var TEXTS = {
    open: ['Open chat', '打开在线客服'],
    close: ['Close chat', '关闭对话'],
    message: ['Message', '消息'],
    placeholder: ['Type your message…', '请输入消息…'],
    send: ['Send', '发送'],
    attach: ['Attach an image', '发送图片'],
    you: ['You', '我'],
    bot: ['Assistant', '智能助手'],
    agent: ['Support agent', '人工客服'],
    system: ['Notice', '通知'],
    typing: ['Assistant is typing', '助手正在输入'],
    agentTyping: ['Support agent is typing', '人工客服正在输入'],
    log: ['Chat messages', '聊天记录'],
    suggestions: ['Suggestions', '常见问题'],
    online: ['Online · we reply in seconds', '在线 · 秒级回复'],
    connecting: ['Connecting…', '正在连接…'],
    reconnecting: ['Reconnecting…', '正在重新连接…'],
    offline: ['Can’t reach the chat service.', '暂时无法连接客服服务。'],
    retryIn: ['Trying again in {n} s.', '{n} 秒后重试。'],
    retryNow: ['Retry now', '立即重试'],
    sending: ['Sending…', '发送中…'],
    queued: ['Will be sent when the connection is back', '网络恢复后自动发送'],
    failed: ['Not sent: {why}', '未发送：{why}'],
    retry: ['Retry', '重试'],
    limited: ['Too many messages: sending again in {n} s', '发送太频繁，{n} 秒后自动重发'],
    unread: ['{n} unread', '{n} 条未读'],
    refused: ['This chat isn’t available on this page.', '此页面暂不支持在线客服。'],
    tooBig: ['Images may be at most {n} MB.', '图片不能超过 {n} MB。'],
    badType: ['Only images (PNG, JPEG, GIF or WebP) can be sent.', '只能发送图片（PNG、JPEG、GIF 或 WebP）。'],
    uploadFailed: ['The image could not be uploaded.', '图片上传失败。'],
    imageFrom: ['Image from {who}', '{who}发送的图片']
  };
  function textsIn(lang) {
    var i = LANGS.indexOf(lang), out = {};
    Object.keys(TEXTS).forEach(function (k) { out[k] = TEXTS[k][i]; });
    return out;
  }

  // -- small helpers -------------------------------------------------------------------------

  var memory = {};
  function load(k) {
    try { return window.localStorage.getItem(KEY + k); } catch (e) { return memory[k] || null; }
  }
  function save(k, v) {
    try {
      if (v === null) window.localStorage.removeItem(KEY + k);
      else window.localStorage.setItem(KEY + k, v);
    } catch (e) { memory[k] = v; }
  }
  function randomId(bytes) {
    var a = new Uint8Array(bytes);
    window.crypto.getRandomValues(a);
    return btoa(String.fromCharCode.apply(null, a))
      .replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
  }
  function fmt(s, n) { return s.replace('{n}', n).replace('{why}', n).replace('{who}', n); }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text != null) e.textContent = text;
    return e;
  }
  // http(s) addresses in a message (a cited shop page) become links; everything stays text
  // nodes, so a message can never inject markup. Punctuation ending a sentence is not part
  // of the address.
  var URL_RE = /https?:\/\/[^\s<>"'`\u3000-\u303f\uff08\uff09\uff0c\uff1b]+/g;
  function linkify(parent, text) {
    var at = 0;
    text.replace(URL_RE, function (found, index) {
      var url = found.replace(/[.,;:!?)\]}'"]+$/, '');
      var safe = null;
      try { safe = new URL(url); } catch (e) { safe = null; }
      if (!safe || (safe.protocol !== 'http:' && safe.protocol !== 'https:')) return found;
      if (index > at) parent.appendChild(document.createTextNode(text.slice(at, index)));
      var a = el('a', 'link', url);
      a.href = safe.href;
      a.target = '_blank';
      a.rel = 'noopener noreferrer';
      parent.appendChild(a);
      at = index + url.length;
      return found;
    });
    if (at < text.length) parent.appendChild(document.createTextNode(text.slice(at)));
    return parent;
  }
  var ICON = {
    chat: 'M4 5.5A2.5 2.5 0 0 1 6.5 3h11A2.5 2.5 0 0 1 20 5.5v8a2.5 2.5 0 0 1-2.5 2.5H10l-4.2 3.6c-.5.4-1.3.1-1.3-.6V16A2.5 2.5 0 0 1 4 13.5z',
    close: 'M6.4 5 5 6.4 10.6 12 5 17.6 6.4 19l5.6-5.6 5.6 5.6 1.4-1.4-5.6-5.6L19 6.4 17.6 5 12 10.6z',
    send: 'M3.4 20.4 21 12 3.4 3.6 3.4 10l12.6 2-12.6 2z',
    clip: 'M16.5 6v11.5a4 4 0 0 1-8 0V5a2.5 2.5 0 0 1 5 0v10.5a1 1 0 0 1-2 0V6H10v9.5a2.5 2.5 0 0 0 5 0V5a4 4 0 0 0-8 0v12.5a5.5 5.5 0 0 0 11 0V6z',
    bot: 'M12 2a1.5 1.5 0 0 1 .8 2.8V6H17a3 3 0 0 1 3 3v8a3 3 0 0 1-3 3H7a3 3 0 0 1-3-3V9a3 3 0 0 1 3-3h4.2V4.8A1.5 1.5 0 0 1 12 2zM9 11.5a1.5 1.5 0 1 0 0 3 1.5 1.5 0 0 0 0-3zm6 0a1.5 1.5 0 1 0 0 3 1.5 1.5 0 0 0 0-3z'
  };
  function icon(name) {
    return '<svg viewBox="0 0 24 24" aria-hidden="true" focusable="false"><path d="' +
      ICON[name] + '"/></svg>';
  }

  // -- state ---------------------------------------------------------------------------------

  var S = {
    cfg: null, T: textsIn('en'), loc: 'en', token: null, conv: null,
    wm: 0, seen: {}, streams: {}, outbox: [], typingSeq: null,
    open: load('open') === '1', unread: 0, readSeq: +(load('read') || 0),
    mode: D.transport === 'sse' ? 'sse' : 'ws', ws: null, es: null, connected: false,
    attempt: 0, wsFailures: 0, timer: null, retryAt: 0, lastFrame: 0, pingTimer: null,
    fatal: null, loaded: false, sentAny: false, link: 0
  };

  function identityToken() {
    // A token belongs to one shop user: a different login (or a logout) starts afresh.
    var uid = D.userId || '';
    var known = load('uid');
    var token = load('token');
    if (token && known && known !== uid) {
      ['token', 'conv', 'outbox', 'read'].forEach(function (k) { save(k, null); });
      token = null;
      S.readSeq = 0;
    }
    if (!token) { token = randomId(24); save('token', token); }
    if (uid) save('uid', uid);
    return token;
  }

  // -- DOM -----------------------------------------------------------------------------------

  var host = document.createElement('swarmdesk-widget');
  var root = host.attachShadow({ mode: 'open' });
  root.innerHTML =
    '<style>:host{all:initial}.sd[hidden],[hidden]{display:none!important}</style>' +
    '<link rel="stylesheet" href="' + BASE + '/widget.css">' +
    '<div class="sd" hidden>' +
    '<button class="launcher" type="button" aria-expanded="false">' + icon('chat') +
    '<span class="badge" hidden></span></button>' +
    '<section class="panel" role="dialog" aria-labelledby="sd-title" hidden>' +
    '<header><span class="avatar">' + icon('bot') + '</span><div class="heading">' +
    '<h2 id="sd-title"></h2><p class="status" role="status"></p></div>' +
    '<button class="close" type="button">' + icon('close') + '</button></header>' +
    '<div class="banner" role="alert" hidden><span class="banner-text"></span>' +
    '<button class="banner-retry" type="button"></button></div>' +
    '<div class="log" role="log" aria-live="polite" tabindex="0"></div>' +
    '<div class="quick" role="group" hidden></div>' +
    '<form class="composer"><button class="attach" type="button">' + icon('clip') + '</button>' +
    '<input class="file" type="file" accept="image/png,image/jpeg,image/gif,image/webp" hidden>' +
    '<textarea rows="1"></textarea>' +
    '<button class="send" type="submit">' + icon('send') + '</button></form>' +
    '</section></div>';
  function q(sel) { return root.querySelector(sel); }
  var ui = {
    box: q('.sd'), launcher: q('.launcher'), badge: q('.badge'), panel: q('.panel'),
    title: q('#sd-title'), status: q('.status'), close: q('.close'), banner: q('.banner'),
    bannerText: q('.banner-text'), bannerRetry: q('.banner-retry'), log: q('.log'),
    quick: q('.quick'), form: q('.composer'), attach: q('.attach'), file: q('.file'),
    input: q('textarea'), send: q('.send')
  };
  q('link').addEventListener('load', function () { ui.box.hidden = false; });
  q('link').addEventListener('error', function () { ui.box.hidden = false; });

  function applyLooks() {
    var c = S.cfg || {};
    var colour = D.colour || D.color || c.colour || '#2563eb';
    if (/^#[0-9a-fA-F]{3,6}$/.test(colour)) ui.box.style.setProperty('--sd-accent', colour);
    ui.box.classList.toggle('left', (D.position || c.position) === 'left');
    var lang = D.locale || (c.locale && c.locale !== 'auto' ? c.locale : '') ||
      document.documentElement.lang || navigator.language || 'en';
    S.loc = /^zh/i.test(lang) ? 'zh' : 'en';
    S.T = textsIn(S.loc);
    var T = S.T;
    ui.panel.setAttribute('lang', S.loc === 'zh' ? 'zh-CN' : 'en');
    ui.title.textContent = pick(c.title) || T.bot;
    ui.close.setAttribute('aria-label', T.close);
    ui.log.setAttribute('aria-label', T.log);
    ui.quick.setAttribute('aria-label', T.suggestions);
    ui.attach.setAttribute('aria-label', T.attach);
    ui.attach.title = T.attach;
    ui.input.setAttribute('aria-label', T.message);
    ui.input.placeholder = T.placeholder;
    ui.send.setAttribute('aria-label', T.send);
    ui.bannerRetry.textContent = T.retryNow;
    ui.attach.hidden = !(c.attachments && c.attachments.enabled);
    updateLauncher();
  }
  function pick(map) {
    if (!map) return '';
    return map[S.loc] || map.en || map[Object.keys(map)[0]] || '';
  }

  function setStatus(kind) {
    ui.status.textContent = S.T[kind] || '';
    ui.box.dataset.state = kind;
  }

  function updateLauncher() {
    var T = S.T;
    ui.launcher.setAttribute('aria-expanded', S.open ? 'true' : 'false');
    var label = S.open ? T.close : T.open;
    if (S.unread && !S.open) label += ' (' + fmt(T.unread, S.unread) + ')';
    ui.launcher.setAttribute('aria-label', label);
    ui.badge.hidden = !S.unread || S.open;
    ui.badge.textContent = S.unread > 9 ? '9+' : String(S.unread);
  }

  function setOpen(open, focus) {
    S.open = open;
    save('open', open ? '1' : '0');
    ui.panel.hidden = !open;
    ui.box.classList.toggle('is-open', open);
    if (open) {
      S.unread = 0;
      markRead();
      scrollDown();
      if (focus) ui.input.focus();
    } else if (focus) {
      ui.launcher.focus();
    }
    updateLauncher();
  }
  function markRead() {
    var top = S.wm;
    Object.keys(S.seen).forEach(function (s) { top = Math.max(top, +s); });
    if (top > S.readSeq) { S.readSeq = top; save('read', String(top)); }
  }

  function scrollDown() { ui.log.scrollTop = ui.log.scrollHeight; }

  function timeOf(iso) {
    var d = iso ? new Date(iso) : new Date();
    return d.toLocaleTimeString(S.loc === 'zh' ? 'zh-CN' : 'en', {
      hour: '2-digit', minute: '2-digit'
    });
  }

  function who(sender) {
    var T = S.T;
    return sender === 'contact' ? T.you : sender === 'agent' ? T.agent :
      sender === 'system' ? T.system : T.bot;
  }

  // One message row: who wrote it (visible for others, for screen readers always), the text
  // and images, the time.
  function bubble(sender, text, attachments, iso) {
    var mine = sender === 'contact';
    var row = el('div', 'msg from-' + (mine ? 'me' : sender === 'agent' ? 'agent' :
      sender === 'system' ? 'system' : 'bot'));
    row.appendChild(el('span', mine ? 'who sr-only' : 'who', who(sender)));
    var b = el('div', 'bubble');
    if (text) b.appendChild(linkify(el('p', 'text'), text));
    (attachments || []).forEach(function (a) {
      if (!a || !a.url) return;
      var img = el('img', 'image');
      img.src = /^(blob:|https?:)/.test(a.url) ? a.url : ORIGIN + a.url;
      img.alt = fmt(S.T.imageFrom, who(sender));
      img.loading = 'lazy';
      b.appendChild(img);
    });
    row.appendChild(b);
    row.appendChild(el('span', 'meta', timeOf(iso)));
    return row;
  }

  // Rows stay in seq order; rows not stored yet (the visitor's pending ones) stay last.
  function place(row, seq) {
    if (seq != null) row.dataset.seq = seq;
    var kids = ui.log.children;
    for (var i = 0; i < kids.length; i++) {
      var k = kids[i];
      if (k.classList.contains('typing') || k.classList.contains('pending') ||
          (seq != null && k.dataset.seq && +k.dataset.seq > seq)) {
        ui.log.insertBefore(row, k);
        return;
      }
    }
    ui.log.appendChild(row);
  }

  function greet() {
    var text = pick(S.cfg && S.cfg.greeting);
    if (text && !ui.log.querySelector('.greeting')) {
      var g = bubble('bot', text, [], null);
      g.classList.add('greeting');
      g.querySelector('.meta').remove();
      ui.log.insertBefore(g, ui.log.firstChild);
    }
    showQuickReplies();
  }
  function showQuickReplies() {
    var list = (S.cfg && S.cfg.quick_replies && (S.cfg.quick_replies[S.loc] ||
      S.cfg.quick_replies.en)) || [];
    ui.quick.textContent = '';
    list.forEach(function (text) {
      var b = el('button', 'chip', text);
      b.type = 'button';
      b.addEventListener('click', function () { submit(text, null); ui.input.focus(); });
      ui.quick.appendChild(b);
    });
    ui.quick.hidden = !list.length || S.sentAny || !!ui.log.querySelector('.from-me');
  }

  // A person typing in the console sends a hint every few seconds: it fades without one.
  var AGENT_TYPING_MS = 6000;
  var agentTypingTimer = null;
  function showTyping(seq, byAgent) {
    if (S.streams[seq] || seq <= S.wm || S.seen[seq]) return;
    clearTimeout(agentTypingTimer);
    if (byAgent) agentTypingTimer = setTimeout(hideTyping, AGENT_TYPING_MS);
    if (S.typingSeq === seq && ui.log.querySelector('.typing')) return;
    hideTyping();
    S.typingSeq = seq;
    var row = el('div', 'msg from-bot typing');
    row.setAttribute('aria-label', byAgent ? S.T.agentTyping : S.T.typing);
    row.setAttribute('role', 'status');
    var b = el('div', 'bubble');
    for (var i = 0; i < 3; i++) b.appendChild(el('span', 'dot'));
    row.appendChild(b);
    ui.log.appendChild(row);
    scrollDown();
  }
  function hideTyping() {
    var t = ui.log.querySelector('.typing');
    if (t) t.remove();
    S.typingSeq = null;
  }

  // -- conversation events -------------------------------------------------------------------

  // Seqs the page has: everything up to the watermark, and `seen` above it.
  function admit(seq) {
    if (seq <= S.wm || S.seen[seq]) return false;
    S.seen[seq] = 1;
    while (S.seen[S.wm + 1]) { delete S.seen[S.wm + 1]; S.wm++; }
    return true;
  }

  function resetConversation(id) {
    // Rows of an earlier conversation stay on screen, out of the new one's seq order.
    ui.log.querySelectorAll('[data-seq]').forEach(function (r) { delete r.dataset.seq; });
    if (S.conv !== null) { S.readSeq = 0; save('read', null); }
    S.conv = id;
    S.wm = 0;
    S.seen = {};
    S.streams = {};
    save('conv', id == null ? null : String(id));
  }

  function onDelta(f) {
    if (f.seq <= S.wm || S.seen[f.seq]) return; // its final is here already
    var st = S.streams[f.seq];
    if (!st) {
      if (S.typingSeq !== null) hideTyping();
      var row = bubble('bot', '', [], null);
      row.classList.add('streaming');
      row.setAttribute('aria-hidden', 'true'); // read out once, complete, at the final
      var p = el('p', 'text');
      row.querySelector('.bubble').appendChild(p);
      st = S.streams[f.seq] = { row: row, text: p, index: -1 };
      place(row, f.seq);
    }
    if (f.index <= st.index) return; // a resend after resume
    st.index = f.index;
    st.text.textContent += f.text;
    scrollDown();
  }

  function onDurable(f) {
    if (!admit(f.seq)) return;
    var st = S.streams[f.seq];
    delete S.streams[f.seq];
    if (S.typingSeq !== null && S.typingSeq <= f.seq) hideTyping();
    if (f.type === 'error') { // an answer cut by a crash: a new one follows
      if (st) st.row.remove();
      return;
    }
    if (f.sender === 'contact' && claimPending(f)) return;
    var row = bubble(f.sender, f.text, f.attachments, f.created_at);
    if (st) st.row.replaceWith(row);
    else place(row, f.seq);
    if (f.sender === 'contact') {
      S.sentAny = true;
      ui.quick.hidden = true;
    } else if (f.seq > S.readSeq) {
      if (S.open && !document.hidden) markRead();
      else { S.unread++; updateLauncher(); }
    }
    scrollDown();
  }

  function handle(f) {
    S.lastFrame = Date.now();
    switch (f.type) {
      case 'ready': return onReady(f);
      case 'delta': return onDelta(f);
      case 'message': case 'final': case 'error': return onDurable(f);
      case 'typing': return showTyping(f.seq, f.by === 'agent');
      case 'ack': return onAck(f);
      case 'conversation':
        if (f.conversation_id !== S.conv) resetConversation(f.conversation_id);
        return;
      case 'problem': return onProblem(f);
    }
  }

  function onReady(f) {
    if (f.conversation_id !== S.conv) resetConversation(f.conversation_id);
    if (f.from > S.wm) S.wm = f.from;
    S.connected = true;
    S.link++;
    S.attempt = 0;
    S.wsFailures = 0;
    S.loaded = true;
    hideBanner();
    setStatus('online');
    if (f.identity_problem && window.console) {
      console.warn('swarmdesk: user not verified: ' + f.identity_problem);
    }
    flush();
  }

  // -- sending: an outbox that survives reloads and reconnects -----------------------------------

  function saveOutbox() {
    var keep = S.outbox.filter(function (m) { return m.ready; }).map(function (m) {
      return { cid: m.cid, text: m.text, atts: m.atts };
    });
    save('outbox', keep.length ? JSON.stringify(keep) : null);
  }

  function pendingRow(m) {
    var row = bubble('contact', m.text, m.atts, null);
    row.classList.add('pending');
    row.appendChild(el('span', 'state'));
    m.row = row;
    place(row, null);
    scrollDown();
  }
  function rowState(m, text, failed) {
    var s = m.row && m.row.querySelector('.state');
    if (!s) return;
    s.textContent = text || '';
    m.row.classList.toggle('failed', !!failed);
    if (failed) {
      var again = el('button', 'again', S.T.retry);
      again.type = 'button';
      again.addEventListener('click', function () {
        m.row.classList.remove('failed');
        if (m.file && !m.atts[0].id) upload(m);
        else { m.ready = true; saveOutbox(); flush(); }
      });
      s.appendChild(document.createTextNode(' '));
      s.appendChild(again);
    }
  }

  function submit(text, file) {
    if (S.fatal) return;
    var m = { cid: 'c' + randomId(12), text: text || '', atts: [], ready: !file, file: file };
    if (file) m.atts = [{ url: URL.createObjectURL(file) }];
    S.outbox.push(m);
    S.sentAny = true;
    ui.quick.hidden = true;
    pendingRow(m);
    if (file) upload(m);
    else { saveOutbox(); flush(); }
  }

  function flush() {
    S.outbox.forEach(function (m) {
      if (!m.ready || m.waitUntil > Date.now()) return;
      if (!S.connected) { rowState(m, S.T.queued); return; }
      if (m.sentOn === S.link) return; // in flight on this connection already
      rowState(m, S.T.sending);
      transmit(m);
    });
  }

  function sendFrame(m) {
    return {
      type: 'send', client_id: m.cid, text: m.text,
      attachments: m.atts.map(function (a) { return a.id; })
    };
  }

  function transmit(m) {
    m.transmitted = true;
    m.sentOn = S.link;
    var frame = sendFrame(m);
    if (S.mode === 'ws') {
      if (S.ws && S.ws.readyState === 1) S.ws.send(JSON.stringify(frame));
      return;
    }
    frame.token = S.token;
    frame.user = user();
    fetch(BASE + '/messages?site=' + encodeURIComponent(SITE), {
      method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(frame)
    }).then(function (r) {
      return r.json().then(function (body) {
        if (r.ok) onAck(body);
        else onProblem({ client_id: m.cid, code: body.error, detail: body.detail,
          retry_after: +(r.headers.get('Retry-After') || 0) });
      });
    }).catch(function () { lost(); });
  }

  function onAck(f) {
    var m = find(f.client_id);
    if (f.conversation_id !== S.conv) {
      resetConversation(f.conversation_id);
      if (S.mode === 'sse') { closeSse(); connectSse(); }
    }
    if (!m) return; // its stored copy came first and took its place already
    if (!admit(f.seq) && ui.log.querySelector('[data-seq="' + f.seq + '"]')) {
      // A resend of a message already shown from history (its first ack was lost).
      m.row.remove();
      m.row = null;
    }
    finishPending(m, f.seq);
  }
  function find(cid) {
    for (var i = 0; i < S.outbox.length; i++) if (S.outbox[i].cid === cid) return S.outbox[i];
    return null;
  }
  function finishPending(m, seq) {
    S.outbox.splice(S.outbox.indexOf(m), 1);
    saveOutbox();
    if (m.row) {
      m.row.classList.remove('pending', 'failed');
      var s = m.row.querySelector('.state');
      if (s) s.remove();
      m.row.remove();
      place(m.row, seq);
    }
  }
  // The stored copy of a message this page sent: becomes that message's row.
  function claimPending(f) {
    var atts = (f.attachments || []).length;
    for (var i = 0; i < S.outbox.length; i++) {
      var m = S.outbox[i];
      if (m.transmitted && m.text === f.text && m.atts.length === atts) {
        finishPending(m, f.seq);
        return true;
      }
    }
    return false;
  }

  function onProblem(f) {
    var m = f.client_id ? find(f.client_id) : null;
    if (!m) {
      if (window.console) console.warn('swarmdesk: ' + f.code + ': ' + f.detail);
      return;
    }
    if (f.code === 'rate_limited') {
      var wait = Math.max(1, Math.ceil(f.retry_after || 5));
      m.waitUntil = Date.now() + wait * 1000;
      m.sentOn = null;
      rowState(m, fmt(S.T.limited, wait));
      setTimeout(flush, wait * 1000 + 50);
      return;
    }
    m.ready = false; // the server won't take it as it is
    m.sentOn = null;
    saveOutbox();
    rowState(m, fmt(S.T.failed, f.detail || f.code), true);
  }

  function upload(m) {
    var c = S.cfg && S.cfg.attachments;
    var f = m.file;
    if (!c || c.types.indexOf(f.type) < 0) return rowState(m, S.T.badType, true);
    if (f.size > c.max_bytes) {
      return rowState(m, fmt(S.T.tooBig, Math.round(c.max_bytes / 1048576)), true);
    }
    rowState(m, S.T.sending);
    fetch(BASE + '/uploads?site=' + encodeURIComponent(SITE), {
      method: 'POST', headers: { 'Content-Type': f.type, 'X-Widget-Token': S.token }, body: f
    }).then(function (r) {
      return r.json().then(function (body) {
        if (!r.ok) return rowState(m, fmt(S.T.failed, body.detail || S.T.uploadFailed), true);
        var img = m.row && m.row.querySelector('img');
        if (img) { URL.revokeObjectURL(img.src); img.src = ORIGIN + body.url; }
        m.atts = [{ id: body.id, url: body.url }];
        m.ready = true;
        saveOutbox();
        flush();
      });
    }).catch(function () { rowState(m, S.T.uploadFailed, true); });
  }

  // -- connection ------------------------------------------------------------------------------

  function user() {
    return D.userId ? { id: D.userId, hash: D.userHash || '', name: D.userName || '' } :
      (D.userName ? { name: D.userName } : null);
  }

  function hello() {
    var frame = { type: 'hello', token: S.token, conversation_id: S.conv, user: user(),
      locale: S.loc };
    if (S.loaded) {
      frame.after = S.wm; // resume: only what this page has not got
      var live = null;
      Object.keys(S.streams).forEach(function (s) {
        if (S.streams[s].index >= 0 && (!live || +s > live[0])) live = [+s, S.streams[s].index];
      });
      if (live) frame.delta = live;
    }
    return frame;
  }

  function connect() {
    clearTimeout(S.timer);
    if (S.fatal || S.ws || S.es) return;
    setStatus(S.loaded ? 'reconnecting' : 'connecting');
    if (S.mode === 'sse') return connectSse();
    var url = BASE.replace(/^http/, 'ws') + '/ws?site=' + encodeURIComponent(SITE);
    var ws;
    try { ws = new WebSocket(url); } catch (e) { return lost(); }
    var opened = false;
    S.ws = ws;
    ws.onopen = function () {
      opened = true;
      S.lastFrame = Date.now();
      ws.send(JSON.stringify(hello()));
      startPing(ws);
    };
    ws.onmessage = function (e) {
      var f;
      try { f = JSON.parse(e.data); } catch (x) { return; }
      handle(f);
    };
    ws.onclose = function (e) {
      if (S.ws !== ws) return;
      S.ws = null;
      clearInterval(S.pingTimer);
      if (e.code === 4400) return fatal(e.reason);
      // Any other close (4409 fell behind, 1011 server error, 1001/1012 restart): resume.
      if (!opened) S.wsFailures++;
      lost();
    };
  }

  // The browser can't see WebSocket pings: a quiet socket is checked with an app ping.
  function startPing(ws) {
    clearInterval(S.pingTimer);
    S.pingTimer = setInterval(function () {
      if (ws.readyState !== 1) return;
      if (Date.now() - S.lastFrame > 35000) { ws.close(); return; }
      if (Date.now() - S.lastFrame > 20000) ws.send('{"type":"ping"}');
    }, 5000);
  }

  function closeSse() {
    if (S.es) { S.es.close(); S.es = null; }
  }
  function connectSse() {
    if (!S.conv) { // nothing to follow until the first message opens a conversation
      onReady({ conversation_id: null, from: 0 });
      return;
    }
    var url = BASE + '/events?site=' + encodeURIComponent(SITE) + '&token=' + S.token +
      '&conversation_id=' + S.conv + (S.loaded ? '&after=' + S.wm : '');
    var es = new EventSource(url);
    S.es = es;
    ['ready', 'message', 'delta', 'final', 'error', 'typing'].forEach(function (t) {
      es.addEventListener(t, function (e) {
        if (!e.data) return; // the browser's own connection 'error'
        var f = JSON.parse(e.data);
        f.type = t;
        if (t === 'ready' && f.conversation_id == null) { closeSse(); }
        handle(f);
      });
    });
    es.onerror = function () {
      if (es.readyState === 2) { if (S.es === es) { S.es = null; lost(); } }
      else setStatus('reconnecting'); // EventSource resumes by itself with Last-Event-ID
    };
  }

  function lost() {
    S.connected = false;
    if (S.fatal) return;
    setStatus('reconnecting');
    S.attempt++;
    var delay = Math.min(15000, 500 * Math.pow(2, S.attempt - 1)) * (0.8 + Math.random() * 0.4);
    S.retryAt = Date.now() + delay;
    clearTimeout(S.timer);
    S.timer = setTimeout(retry, delay);
    if (S.attempt >= 2) showBanner();
    flush();
  }

  // Before reconnecting: is the service there at all, and does it still take this page?
  function retry() {
    fetchConfig().then(function (ok) {
      if (!ok) return;
      if (S.mode === 'ws' && S.wsFailures >= 2) S.mode = 'sse'; // WebSockets blocked here
      connect();
    });
  }

  var countdown = null;
  function showBanner() {
    ui.banner.hidden = false;
    clearInterval(countdown);
    var tick = function () {
      var n = Math.max(0, Math.ceil((S.retryAt - Date.now()) / 1000));
      ui.bannerText.textContent = S.T.offline + ' ' + fmt(S.T.retryIn, n);
    };
    tick();
    countdown = setInterval(tick, 1000);
    ui.box.classList.add('offline');
  }
  function hideBanner() {
    ui.banner.hidden = true;
    clearInterval(countdown);
    ui.box.classList.remove('offline');
  }

  function fatal(reason) {
    S.fatal = reason || 'refused';
    clearTimeout(S.timer);
    hideBanner();
    setStatus('refused');
    ui.box.classList.add('refused');
    ui.banner.hidden = false;
    ui.bannerRetry.hidden = true;
    ui.bannerText.textContent = S.T.refused;
    ui.input.disabled = true;
    ui.send.disabled = true;
    ui.attach.disabled = true;
    if (window.console) console.error('swarmdesk: ' + S.fatal);
  }

  // The site's texts and looks; a refusal (unknown site key, origin not allowed) is final.
  function fetchConfig() {
    return fetch(BASE + '/sites/' + encodeURIComponent(SITE), { cache: 'no-cache' })
      .then(function (r) {
        return r.json().then(function (body) {
          if (r.status === 403 || r.status === 404 || r.status === 400) {
            fatal(body.detail || body.error);
            return false;
          }
          if (!r.ok) throw new Error(body.detail);
          var first = !S.cfg;
          S.cfg = body;
          if (first) { applyLooks(); greet(); }
          return true;
        });
      })
      .catch(function () { lost(); return false; });
  }

  // -- events from the visitor -----------------------------------------------------------------

  ui.launcher.addEventListener('click', function () { setOpen(!S.open, true); });
  ui.close.addEventListener('click', function () { setOpen(false, true); });
  ui.panel.addEventListener('keydown', function (e) {
    if (e.key === 'Escape') { e.preventDefault(); setOpen(false, true); }
  });
  ui.bannerRetry.addEventListener('click', function () { clearTimeout(S.timer); retry(); });
  ui.form.addEventListener('submit', function (e) {
    e.preventDefault();
    var text = ui.input.value.trim();
    if (!text || S.fatal) return;
    var max = (S.cfg && S.cfg.max_text_chars) || 4000;
    submit(text.slice(0, max), null);
    ui.input.value = '';
    grow();
  });
  ui.input.addEventListener('keydown', function (e) {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      ui.form.requestSubmit ? ui.form.requestSubmit() : ui.send.click();
    }
  });
  function grow() {
    ui.input.style.height = 'auto';
    ui.input.style.height = Math.min(ui.input.scrollHeight, 120) + 'px';
  }
  ui.input.addEventListener('input', grow);
  ui.attach.addEventListener('click', function () { ui.file.click(); });
  ui.file.addEventListener('change', function () {
    var f = ui.file.files && ui.file.files[0];
    ui.file.value = '';
    if (f) submit('', f);
  });
  window.addEventListener('online', function () { if (!S.connected) retry(); });
  document.addEventListener('visibilitychange', function () {
    if (!document.hidden && S.open) { S.unread = 0; markRead(); updateLauncher(); }
  });

  // -- start -----------------------------------------------------------------------------------

  function start() {
    document.body.appendChild(host);
    S.token = identityToken();
    S.conv = load('conv') ? +load('conv') : null;
    applyLooks();
    setStatus('connecting');
    var saved = [];
    try { saved = JSON.parse(load('outbox') || '[]'); } catch (e) { saved = []; }
    saved.forEach(function (m) {
      var item = { cid: m.cid, text: m.text, atts: m.atts || [], ready: true };
      S.outbox.push(item);
      pendingRow(item);
    });
    if (S.open) setOpen(true, false);
    fetchConfig().then(function (ok) { if (ok) connect(); });
  }

  window.SwarmDesk = {
    open: function () { setOpen(true, true); },
    close: function () { setOpen(false, false); },
    send: function (text) { if (text) submit(String(text), null); },
    // Call on logout: the next visitor on this browser starts a new, anonymous chat.
    reset: function () {
      ['token', 'uid', 'conv', 'outbox', 'read', 'open'].forEach(function (k) { save(k, null); });
    },
    _state: S
  };

  if (document.body) start();
  else document.addEventListener('DOMContentLoaded', start);
})();
