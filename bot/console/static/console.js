/* swarmdesk agent console: plain JS, no build step, served at /console.
 *
 * Talks only to the agent API of its own origin (docs/agent-api.md): the session cookie is
 * HttpOnly, the CSRF token from the session answer goes with every POST/DELETE, and live
 * updates come from the SSE stream /api/v1/agent/events. Every text from a shopper is put
 * in the page with textContent, never as HTML.
 */
(function () {
  'use strict';

  var API = '/api/v1/agent';
  var LIMIT = 100; // conversations in a view, messages in one page of history
  var MAX_TEXT = 4000; // the service's default limit (console.max_reply_chars): a counter near it
  var LANGS = ['en', 'zh'];
  // Each text in both languages, side by side (LANGS order).
  var TEXTS = {
    console: ['Agent console', '客服工作台'],
    skipToInbox: ['Skip to the inbox', '跳到会话列表'],
    signInTitle: ['Sign in to the console', '登录客服工作台'],
    email: ['E-mail', '邮箱'],
    password: ['Password', '密码'],
    signIn: ['Sign in', '登录'],
    signOut: ['Sign out', '退出'],
    inbox: ['Inbox', '会话列表'],
    views: ['Views', '视图'],
    waiting: ['Waiting', '等待人工'],
    mine: ['Mine', '我的'],
    open: ['All open', '全部进行中'],
    resolved: ['Resolved', '已解决'],
    channel: ['Channel', '渠道'],
    account: ['Account', '账号'],
    allChannels: ['All channels', '全部渠道'],
    anyAccount: ['Any account', '全部账号'],
    conversations: ['Conversations', '会话'],
    nothingHere: ['Nothing here.', '暂无会话。'],
    nothingWaiting: ['Nobody is waiting for a person.', '目前没有等待人工的会话。'],
    keys: ['j / k: next / previous · r: reply · s: suggest a reply · / in the reply box: saved answers · Ctrl+Enter: send',
      'j / k：下一个 / 上一个 · r：回复 · s：建议回复 · 输入框开头 /：快捷回复 · Ctrl+Enter：发送'],
    conversation: ['Conversation', '会话'],
    pick: ['Pick a conversation on the left.', '请在左侧选择一个会话。'],
    actions: ['Actions', '操作'],
    claim: ['Claim', '认领'],
    unassign: ['Unassign', '放回等待'],
    assignTo: ['Assign to…', '转给…'],
    assign: ['Assign', '转派'],
    assigned: ['Assigned to {n}.', '已转给 {n}。'],
    handback: ['Hand back to the bot', '交还机器人'],
    resolve: ['Resolve', '标记已解决'],
    earlier: ['Show earlier messages', '查看更早的消息'],
    history: ['Messages', '消息记录'],
    card: ['Handoff card', '转人工卡片'],
    replyLabel: ['Reply or note', '回复或备注'],
    replyPlaceholder: ['Write a reply… (Ctrl+Enter sends)', '输入回复…（Ctrl+Enter 发送）'],
    addNote: ['Add note', '添加备注'],
    send: ['Send reply', '发送回复'],
    claimHint: ['Claim the conversation to reply; notes are always possible.',
      '认领后才能回复；备注随时可加。'],
    resolvedHint: ['Resolved: the shopper’s next message reopens it for the bot.',
      '已解决：顾客再发消息时由机器人重新接待。'],
    noteHint: ['Notes are internal: the shopper never sees them.', '备注仅内部可见，顾客看不到。'],
    live: ['Live', '实时'],
    reconnecting: ['Reconnecting…', '正在重新连接…'],
    waited: ['waited {n}', '已等 {n}'],
    ago: ['{n} ago', '{n}前'],
    justNow: ['just now', '刚刚'],
    overdue: ['Overdue', '超时'],
    ownerBot: ['Bot', '机器人'],
    ownerWaiting: ['Waiting for a person', '等待人工'],
    ownerYou: ['You', '我'],
    ownerAgent: ['Agent {n}', '客服 {n}'],
    ownerHuman: ['A person', '人工'],
    ownerResolved: ['Resolved', '已解决'],
    shopper: ['Shopper', '顾客'],
    bot: ['Bot', '机器人'],
    agent: ['Agent', '客服'],
    you: ['You', '我'],
    system: ['System', '系统'],
    note: ['Internal note', '内部备注'],
    attachment: ['Attachment', '附件'],
    statusFailed: ['not delivered', '未送达'],
    statusUndeliverable: ['the platform refused it', '平台拒收'],
    statusAbandoned: ['stopped', '已中止'],
    statusStreaming: ['being written…', '正在生成…'],
    statusPending: ['sending…', '发送中…'],
    why: ['Why', '原因'],
    intents: ['Intents', '意图'],
    sentiment: ['Sentiment', '情绪'],
    orders: ['Order ids', '订单号'],
    summary: ['Summary', '摘要'],
    since: ['Waiting since', '等待开始'],
    ownership: ['Ownership', '归属变化'],
    noHandoff: ['No handoff: the bot has this conversation.', '未转人工：机器人正在接待。'],
    reason_shopper_request: ['The shopper asked for a person', '顾客要求人工'],
    reason_router: ['Routing: asked for a person or upset', '路由判断：要求人工或情绪激动'],
    reason_fallback_twice: ['The bot fell back twice', '机器人连续两次无法回答'],
    reason_deadline: ['No answer in time', '未能及时回答'],
    reason_answer_cut: ['An answer was cut off', '回复中断'],
    reason_budget: ['The model budget is spent', '模型预算已用完'],
    reason_internal_error: ['The bot failed', '机器人出错'],
    reason_undeliverable: ['The platform refused the bot’s answer', '平台拒收机器人的回复'],
    newWaiting: ['Waiting for a person: {n}', '新的人工请求：{n}'],
    claimed: ['Claimed. Your reply goes to the shopper.', '已认领，您的回复将发给顾客。'],
    handedBack: ['Handed back: the bot answers again.', '已交还，机器人继续接待。'],
    resolvedOk: ['Resolved.', '已标记为解决。'],
    unassigned: ['Back in Waiting.', '已放回等待。'],
    noteSaved: ['Note saved.', '备注已保存。'],
    // suggested reply and saved answers
    suggest: ['Suggest reply', '建议回复'],
    suggesting: ['Drafting…', '生成中…'],
    suggested: ['The bot’s draft is in the box: edit it, then send.', '机器人的草稿已放入输入框：修改后再发送。'],
    savedAnswers: ['Saved answers', '快捷回复'],
    pickerKeys: ['↑ ↓ choose · Enter inserts · Esc closes', '↑ ↓ 选择 · Enter 插入 · Esc 关闭'],
    noSaved: ['No saved answer starts with /{n}', '没有以 /{n} 开头的快捷回复'],
    loading: ['Loading…', '加载中…'],
    rated: ['Rated {n} of 5 by the shopper', '顾客评分：{n} / 5'],
    // the report
    pages: ['Pages', '页面'],
    report: ['Report', '报表'],
    reportTitle: ['Team report', '客服报表'],
    period: ['Period', '时间范围'],
    last7: ['Last 7 days', '最近 7 天'],
    last30: ['Last 30 days', '最近 30 天'],
    refresh: ['Refresh', '刷新'],
    day: ['Day (UTC)', '日期（UTC）'],
    colConversations: ['Conversations', '会话数'],
    botAlone: ['Bot alone', '机器人独立解决'],
    handoffs: ['Handoffs by reason', '转人工（按原因）'],
    p50: ['First human reply p50', '首次人工回复 p50'],
    p90: ['p90', 'p90'],
    satisfaction: ['Satisfaction', '满意度'],
    reportEmpty: ['No conversations in this period.', '这段时间没有会话。'],
    reportNote: ['Days are UTC. Bot alone: never handed to a person. First human reply: from the handoff request to a person’s first reply.',
      '日期按 UTC 计。机器人独立解决：从未转人工。首次人工回复：从请求人工到客服第一次回复。'],
    totalConversations: ['{n} conversations', '会话 {n} 个'],
    oneConversation: ['1 conversation', '会话 1 个'],
    totalBotAlone: ['{n} by the bot alone', '机器人独立解决 {n}'],
    totalHandoffs: ['{n} handed to a person', '转人工 {n} 次'],
    totalRating: ['satisfaction {n}', '满意度 {n}'],
    ratingsCount: ['{n} ratings', '{n} 条评价'],
    oneRating: ['1 rating', '1 条评价'],
    short_shopper_request: ['shopper asked', '顾客要求'],
    short_router: ['asked for a person / upset', '要求人工/情绪激动'],
    short_fallback_twice: ['bot fell back', '机器人答不上'],
    short_deadline: ['too slow', '超时'],
    short_answer_cut: ['answer cut', '回复中断'],
    short_budget: ['budget spent', '预算用完'],
    short_internal_error: ['bot failed', '机器人出错'],
    short_undeliverable: ['platform refused', '平台拒收'],
    // errors, by the API's codes
    err_nothing_to_answer: ['The shopper hasn’t written anything to answer yet.', '顾客还没有发来需要回答的消息。'],
    err_not_yours: ['Claim it first: this conversation isn’t yours.', '请先认领：这个会话不是您的。'],
    err_owned_by_other: ['Another agent has already claimed it.', '其他客服已认领这个会话。'],
    err_resolved: ['This conversation is resolved.', '这个会话已解决。'],
    err_not_allowed: ['Only the agent who has it (or an admin) can do that.',
      '只有负责该会话的客服或管理员可以这样做。'],
    err_unknown_agent: ['No such agent.', '没有这个客服。'],
    err_empty: ['Write something first.', '请先输入内容。'],
    err_too_long: ['Too long to send: please shorten it.', '内容太长，请删减后再发送。'],
    err_csrf: ['The page’s security token was refused. Try again.', '安全令牌无效，请重试。'],
    err_unauthenticated: ['Your session has ended. Sign in again.', '登录已过期，请重新登录。'],
    err_too_many_attempts: ['Too many failed sign-ins. Try again in {n} min.',
      '登录失败次数过多，请 {n} 分钟后再试。'],
    err_wrong_credentials: ['Wrong e-mail address or password.', '邮箱或密码错误。'],
    err_missing_fields: ['Enter your e-mail address and password.', '请输入邮箱和密码。'],
    err_signin: ['Wrong e-mail address or password.', '邮箱或密码错误。'],
    err_network: ['Can’t reach swarmdesk. Check the connection and try again.',
      '无法连接服务器，请检查网络后重试。'],
    err_not_found: ['This conversation no longer exists.', '该会话不存在。'],
    err_other: ['Something went wrong: {n}', '出错了：{n}']
  };
  var CHANNELS = {
    widget: ['Web chat', '网页聊天'],
    telegram: ['Telegram', 'Telegram'],
    wechat: ['WeChat', '微信公众号'],
    wecom: ['WeCom', '企业微信'],
    api: ['HTTP API', 'HTTP API']
  };

  // -- small helpers -------------------------------------------------------------------------

  function $(id) { return document.getElementById(id); }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text != null) e.textContent = text;
    return e;
  }
  // http(s) addresses in a message (the shop pages an answer cites) become links; the rest
  // stays text nodes, so a message can never inject markup. Sentence punctuation after an
  // address is not part of it.
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
  function store(k, v) {
    try {
      if (v === undefined) return window.localStorage.getItem('swarmdesk-console:' + k);
      window.localStorage.setItem('swarmdesk-console:' + k, v);
    } catch (e) { /* private mode: the choice lasts for the page */ }
    return null;
  }
  function t(key, n) {
    var pair = TEXTS[key];
    var s = pair ? pair[LANGS.indexOf(S.lang)] : key;
    return n == null ? s : s.replace('{n}', n);
  }
  function channelName(c) {
    var pair = CHANNELS[c];
    return pair ? pair[LANGS.indexOf(S.lang)] : c;
  }
  function duration(seconds) {
    var s = Math.max(0, Math.round(seconds));
    var zh = S.lang === 'zh';
    if (s < 60) return s + (zh ? ' 秒' : ' s');
    var m = Math.floor(s / 60);
    if (m < 60) return m + (zh ? ' 分钟' : ' min');
    var h = Math.floor(m / 60);
    if (h < 48) return h + (zh ? ' 小时 ' : ' h ') + (m % 60) + (zh ? ' 分' : ' min');
    return Math.floor(h / 24) + (zh ? ' 天' : ' d');
  }
  function clock(iso) {
    if (!iso) return '';
    var d = new Date(iso);
    var today = new Date().toDateString() === d.toDateString();
    var opts = today ? { hour: '2-digit', minute: '2-digit' }
      : { month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit' };
    return new Intl.DateTimeFormat(S.lang === 'zh' ? 'zh-CN' : 'en-GB', opts).format(d);
  }
  function typing(target) {
    var tag = target && target.tagName;
    return tag === 'INPUT' || tag === 'TEXTAREA' || tag === 'SELECT' || (target && target.isContentEditable);
  }

  // -- state ---------------------------------------------------------------------------------

  var S = {
    lang: 'en', me: null, csrf: null,
    view: 'waiting', channel: '', account: '',
    list: [], fetchedAt: 0, known: null, selected: null,
    conv: null, messages: [], firstSeq: null, hasEarlier: false,
    es: null, retry: null, refreshTimer: null, refreshing: false, again: false,
    seenChannels: {}, seenAccounts: {}, agents: {}, announce: {},
    page: 'inbox', drafts: {}, suggesting: false, report: null, reportSeq: 0,
    picker: { open: false, q: '', items: [], active: 0, from: 0, to: 0, seq: 0, loading: false }
  };

  // -- the API -------------------------------------------------------------------------------

  function ApiFailure(status, code, message, retryAfter) {
    this.status = status;
    this.code = code;
    this.message = message;
    this.retryAfter = retryAfter;
  }

  async function api(method, path, body) {
    var headers = { Accept: 'application/json' };
    var init = { method: method, credentials: 'same-origin', headers: headers };
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    if (method !== 'GET' && S.csrf) headers['X-CSRF-Token'] = S.csrf;
    var r;
    try {
      r = await fetch(API + path, init);
    } catch (e) {
      throw new ApiFailure(0, 'network', String(e));
    }
    var data = null;
    try { data = await r.json(); } catch (e) { data = null; }
    if (r.ok) return data;
    // Both shapes the service uses: {"error": {"code", "message"}} and {"error", "detail"}.
    var err = data && data.error;
    var code = err && typeof err === 'object' ? err.code : err;
    var message = err && typeof err === 'object' ? err.message : data && data.detail;
    var failure = new ApiFailure(r.status, code || 'http_' + r.status, message || r.statusText,
      +(r.headers.get('Retry-After') || 0));
    if (r.status === 401 && path !== '/session') {
      signedOut(t('err_unauthenticated'));
    } else if (failure.code === 'csrf') {
      // Signed in again elsewhere: take this session's token, so trying again works.
      api('GET', '/session').then(function (s) { S.csrf = s.csrf_token; }, function () {});
    }
    throw failure;
  }

  function errorText(e) {
    if (!(e instanceof ApiFailure)) return t('err_other', String(e));
    if (e.code === 'too_many_attempts') return t('err_too_many_attempts', Math.max(1, Math.ceil(e.retryAfter / 60)));
    if (TEXTS['err_' + e.code]) return t('err_' + e.code);
    if (e.status === 404) return t('err_not_found');
    return t('err_other', e.message || e.code);
  }

  // -- language --------------------------------------------------------------------------------

  function setLang(lang) {
    S.lang = LANGS.indexOf(lang) >= 0 ? lang : 'en';
    document.documentElement.lang = S.lang === 'zh' ? 'zh-CN' : 'en';
    document.querySelectorAll('[data-t]').forEach(function (e) { e.textContent = t(e.dataset.t); });
    document.querySelectorAll('[data-t-label]').forEach(function (e) {
      e.setAttribute('aria-label', t(e.dataset.tLabel));
    });
    document.querySelectorAll('[data-t-placeholder]').forEach(function (e) {
      e.setAttribute('placeholder', t(e.dataset.tPlaceholder));
    });
    var other = S.lang === 'zh' ? 'en' : 'zh';
    var button = $('lang');
    button.textContent = other === 'zh' ? '中文' : 'English';
    button.lang = other === 'zh' ? 'zh-CN' : 'en';
    button.setAttribute('aria-label', other === 'zh' ? '切换到中文' : 'Switch to English');
    fillChannels();
    renderList();
    renderConv();
    renderReport();
    if (S.picker.open) openPicker(S.picker.q, S.picker.from, S.picker.to); // in the new language
    setLive(S.liveState);
  }

  // -- sign-in ---------------------------------------------------------------------------------

  function signedIn(session) {
    S.me = session.agent || {};
    S.csrf = session.csrf_token;
    $('signin').hidden = true;
    $('pages').hidden = false;
    showPage(pageFromHash());
    $('signout').hidden = false;
    $('me').hidden = false;
    $('me').textContent = S.me.name || S.me.email || '';
    connectEvents();
    loadAgents();
    refresh();
  }

  async function loadAgents() {
    try {
      var got = await api('GET', '/agents');
      S.agents = {};
      (got.agents || []).forEach(function (a) { S.agents[a.id] = a; });
      renderList();
      renderConv();
    } catch (e) { /* assigning waits for the next sign-in; names show as ids */ }
  }

  function fillAssignees(c) {
    var select = $('assignee');
    select.options[0].textContent = t('assignTo');
    while (select.options.length > 1) select.remove(1);
    var current = c.owner === 'human' ? assignee(c) : null;
    Object.keys(S.agents).forEach(function (id) {
      var a = S.agents[id];
      if (a.id === current) return;
      var label = (a.name || a.email) + (S.me && a.id === S.me.id ? ' (' + t('you') + ')' : '');
      select.add(new Option(label, String(a.id)));
    });
  }

  function signedOut(why) {
    if (S.es) { S.es.close(); S.es = null; }
    clearTimeout(S.retry);
    S.me = null;
    S.csrf = null;
    S.selected = null;
    S.conv = null;
    S.list = [];
    S.known = null;
    $('desk').hidden = true;
    $('report').hidden = true;
    $('pages').hidden = true;
    S.report = null;
    S.drafts = {};
    closePicker();
    $('signout').hidden = true;
    $('me').hidden = true;
    setLive(null);
    $('signin').hidden = false;
    $('signin-error').textContent = why || '';
    $('password').value = '';
    $($('email').value ? 'password' : 'email').focus();
  }

  async function signIn(ev) {
    ev.preventDefault();
    var button = ev.target.querySelector('button[type=submit]');
    button.disabled = true;
    $('signin-error').textContent = '';
    try {
      var session = await api('POST', '/session', {
        email: $('email').value.trim(), password: $('password').value
      });
      signedIn(session);
      $('list').focus();
    } catch (e) {
      $('signin-error').textContent = e.status === 401 ? t('err_signin') : errorText(e);
      $('password').select();
    } finally {
      button.disabled = false;
    }
  }

  async function signOut() {
    try { await api('DELETE', '/session'); } catch (e) { /* gone already */ }
    signedOut('');
  }

  // -- live updates ----------------------------------------------------------------------------

  function setLive(state) {
    S.liveState = state;
    var e = $('live');
    e.hidden = !state;
    if (!state) return;
    e.className = 'live ' + state;
    e.textContent = t(state === 'live' ? 'live' : 'reconnecting');
  }

  function connectEvents() {
    if (S.es) S.es.close();
    var es = new EventSource(API + '/events', { withCredentials: true });
    S.es = es;
    es.onopen = function () {
      setLive('live');
      scheduleRefresh(); // whatever happened while the stream was down
    };
    es.onerror = function () {
      setLive('reconnecting');
      if (es.readyState !== EventSource.CLOSED) return; // the browser retries by itself
      // The server refused the stream (a session that ended?): ask, then try again.
      clearTimeout(S.retry);
      S.retry = setTimeout(async function () {
        if (S.es !== es) return;
        try {
          var session = await api('GET', '/session');
          S.csrf = session.csrf_token;
          connectEvents();
        } catch (e) {
          if (e.status === 401) signedOut(t('err_unauthenticated'));
          else S.retry = setTimeout(connectEvents, 5000);
        }
      }, 2000);
    };
    var onMessage = function (ev) { onStoredMessage(parse(ev)); };
    es.addEventListener('message', onMessage);
    es.addEventListener('final', onMessage);
    es.addEventListener('error', function (ev) { if (ev.data) onMessage(ev); });
    es.addEventListener('note', onMessage);
    es.addEventListener('owner', function (ev) { onOwner(parse(ev)); });
  }

  function parse(ev) {
    try { return JSON.parse(ev.data); } catch (e) { return null; }
  }

  function onStoredMessage(data) {
    if (!data) return;
    var m = data.message && data.message.id != null ? data.message : data;
    var cid = m.conversation_id != null ? m.conversation_id : data.conversation_id;
    if (cid === S.selected && S.conv) {
      addMessages([m]);
      renderHistory(true);
      // The shopper wrote to a resolved conversation: a rating, or it is open again.
      if (m.sender === 'contact' && S.conv.owner === 'resolved') loadDetail(cid);
    }
    var item = S.list.find(function (c) { return c.id === cid; });
    if (item && m.kind !== 'note') {
      item.last_message = m;
      renderList();
    }
    scheduleRefresh();
  }

  // {"conversation_id", "owner", "action"}: the list and the open conversation are read again.
  function onOwner(data) {
    if (!data) return;
    var id = data.conversation_id != null ? data.conversation_id : data.id;
    if (data.owner === 'handoff_requested') S.announce[id] = true;
    if (id === S.selected && S.conv) loadDetail(id);
    scheduleRefresh();
  }

  // Many events may come at once: they share one fetch of the list, a moment later.
  function scheduleRefresh() {
    if (S.refreshTimer) return;
    S.refreshTimer = setTimeout(function () {
      S.refreshTimer = null;
      refresh();
    }, 300);
  }

  // -- the inbox -------------------------------------------------------------------------------

  function query(view) {
    var q = new URLSearchParams({ view: view, limit: String(LIMIT) });
    if (S.channel) q.set('channel', S.channel);
    if (S.account) q.set('account', S.account);
    return '/conversations?' + q.toString();
  }

  async function refresh() {
    if (!S.me) return;
    if (S.refreshing) { S.again = true; return; }
    S.refreshing = true;
    try {
      var view = S.view;
      var got = await api('GET', query(view));
      var waiting = view === 'waiting' ? got : await api('GET', query('waiting'));
      if (view !== S.view) return; // the agent switched views meanwhile
      var list = got.conversations || [];
      var known = S.known;
      S.known = S.known || {};
      list.forEach(function (c) {
        c.isNew = known !== null && !known[c.id];
        S.known[c.id] = true;
        S.seenChannels[c.channel] = true;
        S.seenAccounts[c.account] = true;
      });
      S.list = list;
      S.fetchedAt = Date.now();
      (waiting.conversations || []).forEach(function (c) {
        if (S.announce[c.id]) toast(t('newWaiting', contactName(c)));
      });
      S.announce = {};
      var n = (waiting.conversations || []).length;
      $('count-waiting').textContent = n ? String(n) : '';
      document.title = (n ? '(' + n + ') ' : '') + 'swarmdesk console';
      fillChannels();
      fillAccounts();
      renderList();
    } catch (e) {
      if (e.status !== 401) toast(errorText(e), true);
    } finally {
      S.refreshing = false;
      if (S.again) { S.again = false; scheduleRefresh(); }
    }
  }

  function fillChannels() {
    var select = $('f-channel');
    var names = Object.keys(CHANNELS);
    Object.keys(S.seenChannels).forEach(function (c) { if (names.indexOf(c) < 0) names.push(c); });
    var keep = select.value;
    while (select.options.length > 1) select.remove(1);
    select.options[0].textContent = t('allChannels');
    names.forEach(function (c) { select.add(new Option(channelName(c), c)); });
    select.value = keep;
  }

  function fillAccounts() {
    var list = $('accounts');
    list.textContent = '';
    Object.keys(S.seenAccounts).sort().forEach(function (a) { list.appendChild(new Option(a)); });
  }

  function contactName(c) {
    var contact = c.contact || {};
    return contact.name || contact.external_id || c.chat_id || '#' + c.id;
  }

  function assignee(c) {
    var a = c.assigned_agent;
    if (a && typeof a === 'object') return a.id;
    return c.assigned_agent_id != null ? c.assigned_agent_id : a;
  }

  function isMine(c) {
    var id = assignee(c);
    return c.owner === 'human' && !!S.me && id != null && id === S.me.id;
  }

  function agentName(id) {
    var a = S.agents[id];
    return a ? a.name || a.email : t('ownerAgent', '#' + id);
  }

  function ownerText(c) {
    if (c.owner === 'bot') return t('ownerBot');
    if (c.owner === 'handoff_requested') return t('ownerWaiting');
    if (c.owner === 'resolved') return t('ownerResolved');
    if (isMine(c)) return t('ownerYou');
    var id = assignee(c);
    return id != null ? agentName(id) : t('ownerHuman');
  }

  function ageText(c) {
    if (S.view === 'waiting' && c.waiting_seconds != null) {
      return t('waited', duration(c.waiting_seconds + (Date.now() - S.fetchedAt) / 1000));
    }
    var at = c.updated_at || (c.last_message && c.last_message.created_at);
    if (!at) return '';
    var seconds = (Date.now() - new Date(at).getTime()) / 1000;
    return seconds < 60 ? t('justNow') : t('ago', duration(seconds));
  }

  function renderList() {
    var ul = $('list');
    if (!ul) return;
    var focusedId = document.activeElement && document.activeElement.dataset
      ? document.activeElement.dataset.id : null;
    ul.textContent = '';
    S.list.forEach(function (c) {
      var li = el('li', 'item');
      li.id = 'conv-' + c.id;
      li.dataset.id = String(c.id);
      li.setAttribute('role', 'option');
      var selected = c.id === S.selected;
      li.setAttribute('aria-selected', selected ? 'true' : 'false');
      li.tabIndex = -1;
      if (c.overdue) li.classList.add('overdue');
      if (c.isNew) li.classList.add('new');
      li.classList.add('owner-' + c.owner);
      var top = el('div', 'row');
      top.appendChild(el('span', 'name', contactName(c)));
      top.appendChild(el('span', 'age', ageText(c)));
      li.appendChild(top);
      var mid = el('div', 'row meta');
      mid.appendChild(el('span', 'chan', channelName(c.channel) + ' · ' + c.account));
      if (c.rating != null) mid.appendChild(ratingStars(c.rating));
      if (c.overdue) mid.appendChild(el('span', 'flag', t('overdue')));
      else if (S.view !== 'waiting') mid.appendChild(el('span', 'owner', ownerText(c)));
      li.appendChild(mid);
      var last = c.last_message;
      var preview = last ? last.text || '' : '';
      var reason = c.handoff && c.handoff.reason;
      if (reason && c.owner === 'handoff_requested') {
        li.appendChild(el('div', 'reason', reasonText(reason)));
      }
      li.appendChild(el('div', 'preview', preview.replace(/\s+/g, ' ').slice(0, 140)));
      li.addEventListener('click', function () { select(c.id, false); });
      ul.appendChild(li);
    });
    var current = ul.querySelector('[aria-selected=true]') || ul.firstElementChild;
    if (current) current.tabIndex = 0;
    ul.tabIndex = current ? -1 : 0;
    var empty = $('list-empty');
    empty.hidden = S.list.length > 0;
    empty.textContent = S.view === 'waiting' ? t('nothingWaiting') : t('nothingHere');
    if (focusedId) {
      var again = ul.querySelector('[data-id="' + focusedId + '"]');
      if (again) again.focus();
    }
  }

  function setView(view) {
    S.view = view;
    S.known = null;
    document.querySelectorAll('.views [role=tab]').forEach(function (b) {
      var on = b.dataset.view === view;
      b.setAttribute('aria-selected', on ? 'true' : 'false');
      b.tabIndex = on ? 0 : -1;
    });
    S.list = [];
    renderList();
    refresh();
  }

  function move(step) {
    if (!S.list.length) return;
    var i = S.list.findIndex(function (c) { return c.id === S.selected; });
    i = i < 0 ? (step > 0 ? 0 : S.list.length - 1) : Math.min(S.list.length - 1, Math.max(0, i + step));
    select(S.list[i].id, true);
  }

  function select(id, keepFocusInList) {
    // What was written stays with its conversation: a draft never goes to another shopper.
    var box = $('text');
    if (S.selected != null) S.drafts[S.selected] = box.value;
    box.value = S.drafts[id] || '';
    updateChars();
    closePicker();
    S.selected = id;
    renderList();
    var li = $('conv-' + id);
    if (li) {
      li.scrollIntoView({ block: 'nearest' });
      if (keepFocusInList !== false) li.focus();
    }
    var summary = S.list.find(function (c) { return c.id === id; });
    S.conv = summary ? Object.assign({}, summary) : { id: id };
    S.messages = [];
    S.firstSeq = null;
    $('c-error').textContent = '';
    renderConv();
    loadDetail(id);
    loadMessages(id, null);
  }

  // -- one conversation ------------------------------------------------------------------------

  async function loadDetail(id) {
    try {
      var c = await api('GET', '/conversations/' + id);
      if (S.selected !== id) return;
      S.conv = Object.assign(S.conv || {}, c);
      renderConv();
    } catch (e) {
      if (S.selected === id && e.status !== 401) $('c-error').textContent = errorText(e);
    }
  }

  async function loadMessages(id, before) {
    var q = new URLSearchParams({ limit: String(LIMIT) });
    if (before != null) q.set('before', String(before));
    try {
      var got = await api('GET', '/conversations/' + id + '/messages?' + q.toString());
      if (S.selected !== id) return;
      var msgs = got.messages || [];
      var withSeq = msgs.filter(function (m) { return m.seq != null; });
      S.hasEarlier = withSeq.length >= LIMIT;
      if (withSeq.length) S.firstSeq = withSeq[0].seq;
      addMessages(msgs);
      renderHistory(before == null);
    } catch (e) {
      if (S.selected === id && e.status !== 401) $('c-error').textContent = errorText(e);
    }
  }

  function key(m) { return (m.kind === 'note' ? 'n' : 'm') + m.id; }

  function addMessages(msgs) {
    var byKey = {};
    S.messages.forEach(function (m, i) { byKey[key(m)] = i; });
    msgs.forEach(function (m) {
      if (m.id == null) return;
      var i = byKey[key(m)];
      if (i == null) { byKey[key(m)] = S.messages.length; S.messages.push(m); return; }
      // The same message again (live event and the API's answer, in either order): keep
      // what each knows, and never go back from a delivered state to 'pending'.
      var old = S.messages[i];
      var merged = Object.assign({}, old, m);
      if (m.agent_id == null) merged.agent_id = old.agent_id;
      if ((m.status === 'pending' || m.status === 'streaming') && old.status &&
          old.status !== 'pending' && old.status !== 'streaming') merged.status = old.status;
      S.messages[i] = merged;
    });
    S.messages.sort(function (a, b) {
      var ta = new Date(a.created_at).getTime(), tb = new Date(b.created_at).getTime();
      if (ta !== tb) return ta - tb;
      return (a.seq || 0) - (b.seq || 0);
    });
  }

  function who(m) {
    if (m.kind === 'note') {
      var mine = S.me && m.agent_id === S.me.id;
      return t('note') + ' · ' + (mine ? t('you') : agentName(m.agent_id));
    }
    if (m.sender === 'contact') return S.conv ? contactName(S.conv) : t('shopper');
    if (m.sender === 'bot') return t('bot');
    if (m.sender === 'system') return t('system');
    if (m.sender === 'agent') {
      if (S.me && m.agent_id != null && m.agent_id === S.me.id) return t('you');
      return m.agent_id != null ? agentName(m.agent_id) : t('agent');
    }
    return m.sender;
  }

  var STATUS_TEXT = {
    failed: 'statusFailed', undeliverable: 'statusUndeliverable', abandoned: 'statusAbandoned',
    streaming: 'statusStreaming', pending: 'statusPending'
  };

  function renderHistory(toBottom) {
    var ol = $('history');
    var wrap = ol.parentNode;
    var nearBottom = wrap.scrollHeight - wrap.scrollTop - wrap.clientHeight < 80;
    ol.textContent = '';
    S.messages.forEach(function (m) {
      var cls = m.kind === 'note' ? 'msg note' : 'msg from-' + m.sender;
      var li = el('li', cls);
      var meta = el('div', 'meta');
      meta.appendChild(el('span', 'who', who(m)));
      meta.appendChild(el('time', 'at', clock(m.created_at)));
      if (m.direction === 'out' && STATUS_TEXT[m.status]) {
        meta.appendChild(el('span', 'state ' + m.status, t(STATUS_TEXT[m.status])));
      }
      li.appendChild(meta);
      if (m.text) li.appendChild(linkify(el('div', 'text'), m.text));
      (m.attachments || []).forEach(function (a) {
        var url = typeof a === 'string' ? a : a && a.url;
        if (url && /^(https?:)?\//.test(url)) {
          var link = el('a', 'attachment', (a && a.name) || t('attachment'));
          link.href = url;
          link.target = '_blank';
          link.rel = 'noopener noreferrer';
          li.appendChild(link);
        }
      });
      ol.appendChild(li);
    });
    $('more').hidden = !S.hasEarlier;
    if (toBottom || nearBottom) wrap.scrollTop = wrap.scrollHeight;
  }

  function reasonText(reason) {
    return TEXTS['reason_' + reason] ? t('reason_' + reason) : reason;
  }

  function cardRow(dl, label, value) {
    if (value == null || value === '' || (Array.isArray(value) && !value.length)) return;
    dl.appendChild(el('dt', null, label));
    var dd = el('dd');
    if (Array.isArray(value)) {
      value.forEach(function (v) {
        dd.appendChild(el('span', 'chip', typeof v === 'string' ? v : JSON.stringify(v)));
      });
    } else {
      dd.textContent = typeof value === 'string' ? value : JSON.stringify(value);
    }
    dl.appendChild(dd);
  }

  var CARD_KNOWN = ['summary', 'intents', 'sentiment', 'order_ids', 'routing_stage'];

  function renderCard(c) {
    var aside = $('card');
    aside.textContent = '';
    aside.appendChild(el('h3', null, t('card')));
    var h = c.handoff;
    if (!h) {
      aside.appendChild(el('p', 'muted', t('noHandoff')));
    } else {
      var card = h.card || {};
      var dl = el('dl');
      cardRow(dl, t('why'), h.reason ? reasonText(h.reason) : null);
      cardRow(dl, t('since'), c.waiting_since ? clock(c.waiting_since) : null);
      cardRow(dl, t('intents'), card.intents);
      cardRow(dl, t('sentiment'), card.sentiment);
      cardRow(dl, t('orders'), card.order_ids);
      cardRow(dl, t('summary'), card.summary);
      // Whatever else the bot found (tool facts...), as it came.
      Object.keys(card).forEach(function (k) {
        if (CARD_KNOWN.indexOf(k) < 0) cardRow(dl, k.replace(/_/g, ' '), card[k]);
      });
      aside.appendChild(dl);
    }
    var events = c.events || [];
    if (events.length) {
      aside.appendChild(el('h3', null, t('ownership')));
      var ol = el('ol', 'events');
      events.forEach(function (e) {
        var li = el('li');
        li.appendChild(el('time', null, clock(e.created_at)));
        var text = ownerLabel(e.from_owner) + ' → ' + ownerLabel(e.to_owner);
        if (e.reason) text += ' (' + reasonText(e.reason) + ')';
        li.appendChild(el('span', null, ' ' + text));
        ol.appendChild(li);
      });
      aside.appendChild(ol);
    }
  }

  function ownerLabel(owner) {
    return ownerText({ owner: owner, assigned_agent: null });
  }

  function renderConv() {
    var c = S.conv;
    $('placeholder').hidden = !!c;
    $('conv').hidden = !c;
    if (!c) return;
    $('c-name').textContent = c.contact || c.chat_id ? contactName(c) : '#' + c.id;
    $('c-sub').textContent = [c.channel && channelName(c.channel), c.account, c.chat_id]
      .filter(Boolean).join(' · ');
    var badge = $('c-owner');
    badge.textContent = c.owner ? ownerText(c) : '';
    badge.className = 'badge owner-' + (c.owner || 'unknown') + (c.overdue ? ' overdue' : '');
    var rating = $('c-rating');
    rating.hidden = c.rating == null;
    if (c.rating != null) showStars(rating, c.rating);
    var mine = isMine(c);
    var resolved = c.owner === 'resolved';
    show('claim', !resolved && !mine && !!c.owner);
    show('unassign', c.owner === 'human');
    show('handback', c.owner === 'human' || c.owner === 'handoff_requested');
    show('resolve', !resolved && !!c.owner);
    var admin = S.me && S.me.role === 'admin';
    var canAssign = !resolved && !!c.owner && (c.owner !== 'human' || mine || admin);
    $('assign-box').hidden = !canAssign || Object.keys(S.agents).length < 2;
    if (canAssign) fillAssignees(c);
    $('send').disabled = resolved;
    var suggestButton = $('suggest');
    suggestButton.hidden = resolved;
    suggestButton.disabled = S.suggesting;
    suggestButton.textContent = t(S.suggesting ? 'suggesting' : 'suggest');
    $('hint').textContent = resolved ? t('resolvedHint') : mine ? t('noteHint') : t('claimHint');
    renderCard(c);
    renderHistory(false);
  }

  function show(act, on) {
    var b = document.querySelector('[data-act=' + act + ']');
    if (b) b.hidden = !on;
  }

  async function act(action, body) {
    var c = S.conv;
    if (!c) return;
    var buttons = document.querySelectorAll('.actions button, .actions select');
    buttons.forEach(function (b) { b.disabled = true; });
    $('c-error').textContent = '';
    try {
      var got = await api('POST', '/conversations/' + c.id + '/' + action, body || {});
      if (S.selected === c.id && got) {
        Object.assign(S.conv, got);
        renderConv();
      }
      if (action === 'assign') toast(t('assigned', agentName(body.agent_id)));
      else toast(t({ claim: 'claimed', handback: 'handedBack', resolve: 'resolvedOk',
        unassign: 'unassigned' }[action]));
      if (action === 'claim') $('text').focus();
      loadDetail(c.id);
      refresh(); // the agent's own move shows at once
    } catch (e) {
      if (e.status !== 401) $('c-error').textContent = errorText(e);
      if (e.status === 409) loadDetail(c.id); // someone else moved it: show where it is now
    } finally {
      buttons.forEach(function (b) { b.disabled = false; });
      var focused = document.activeElement;
      if (!focused || focused === document.body || focused.hidden) $('c-name').focus();
    }
  }

  async function write(kind) {
    var c = S.conv;
    var box = $('text');
    var text = box.value;
    if (!c) return;
    $('c-error').textContent = '';
    if (!text.trim()) { $('c-error').textContent = t('err_empty'); box.focus(); return; }
    $('send').disabled = $('note').disabled = true;
    try {
      var path = '/conversations/' + c.id + (kind === 'note' ? '/notes' : '/reply');
      var got = await api('POST', path, { text: text });
      delete S.drafts[c.id];
      if (S.selected === c.id) {
        box.value = '';
        closePicker();
        updateChars();
      }
      if (got && got.id != null && S.selected === c.id) {
        var m = got.message && got.message.id != null ? got.message : got;
        if (kind === 'note' && !m.kind) m.kind = 'note';
        addMessages([m]);
        renderHistory(true);
      }
      if (kind === 'note') toast(t('noteSaved'));
    } catch (e) {
      if (e.status !== 401) $('c-error').textContent = errorText(e);
    } finally {
      $('send').disabled = S.conv ? S.conv.owner === 'resolved' : false;
      $('note').disabled = false;
      box.focus();
    }
  }

  function updateChars() {
    var n = $('text').value.length;
    var chars = $('chars');
    chars.textContent = n > MAX_TEXT - 500 ? n + ' / ' + MAX_TEXT : '';
    chars.classList.toggle('over', n > MAX_TEXT);
  }

  // -- suggested reply: the bot drafts, the person edits and sends -----------------------------

  async function suggest() {
    var c = S.conv;
    if (!c || S.suggesting || c.owner === 'resolved') return;
    S.suggesting = true;
    renderConv();
    $('c-error').textContent = '';
    try {
      var got = await api('POST', '/conversations/' + c.id + '/suggest', {});
      var draft = got && typeof got.text === 'string' ? got.text.trim() : '';
      if (!draft) return;
      // Never over what the person wrote: the draft goes below it. It is only ever sent by
      // the person, so it lands in the conversation it was drafted for, even if they moved on.
      if (S.selected !== c.id) {
        var kept = (S.drafts[c.id] || '').replace(/\s+$/, '');
        S.drafts[c.id] = kept ? kept + '\n\n' + draft : draft;
        return;
      }
      var box = $('text');
      var before = box.value.replace(/\s+$/, '');
      box.value = before ? before + '\n\n' + draft : draft;
      closePicker();
      updateChars();
      box.focus();
      box.setSelectionRange(box.value.length, box.value.length);
      box.scrollTop = box.scrollHeight;
      toast(t('suggested'));
    } catch (e) {
      if (e.status !== 401 && S.selected === c.id) $('c-error').textContent = errorText(e);
    } finally {
      S.suggesting = false;
      if (S.conv) renderConv();
    }
  }

  // -- saved answers: "/" at the start of the reply box (or the button) opens a picker ----------

  var SLASH = /^\/([\w-]{0,32})$/;

  // The shortcut being typed: the box holds "/" and a shortcut up to the caret, else null.
  function slashQuery() {
    var box = $('text');
    if (box.selectionStart !== box.selectionEnd) return null;
    var m = SLASH.exec(box.value.slice(0, box.selectionStart));
    return m ? m[1] : null;
  }

  function onComposerInput() {
    updateChars();
    var q = slashQuery();
    if (q == null) closePicker();
    else openPicker(q, 0, q.length + 1);
  }

  // Opens (or narrows) the picker for shortcut prefix q; the chosen text replaces from..to.
  async function openPicker(q, from, to) {
    var P = S.picker;
    var c = S.conv;
    if (!c) return;
    var lower = q.toLowerCase();
    P.open = true;
    P.q = q;
    P.from = from;
    P.to = to;
    // What is known narrows at once (same rule as the service); the service's answer follows.
    P.items = P.items.filter(function (i) { return i.shortcut.toLowerCase().indexOf(lower) === 0; });
    P.active = Math.min(P.active, Math.max(0, P.items.length - 1));
    P.loading = true;
    var seq = ++P.seq;
    renderPicker();
    var query = new URLSearchParams({ q: q, language: S.lang, conversation_id: String(c.id) });
    try {
      var got = await api('GET', '/canned?' + query.toString());
      if (seq !== P.seq || !P.open) return;
      P.items = got.canned || [];
      P.active = Math.min(P.active, Math.max(0, P.items.length - 1));
      P.loading = false;
      renderPicker();
    } catch (e) {
      if (seq !== P.seq) return;
      closePicker();
      if (e.status !== 401) $('c-error').textContent = errorText(e);
    }
  }

  function closePicker() {
    var P = S.picker;
    P.seq++;
    if (!P.open) return;
    P.open = false;
    P.items = [];
    P.active = 0;
    renderPicker();
  }

  function renderPicker() {
    var P = S.picker;
    var box = $('text');
    $('picker').hidden = !P.open;
    var ul = $('picker-list');
    ul.textContent = '';
    box.removeAttribute('aria-activedescendant');
    if (!P.open) return;
    P.items.forEach(function (item, i) {
      var li = el('li', 'pick');
      li.id = 'pick-' + i;
      li.setAttribute('role', 'option');
      li.setAttribute('aria-selected', i === P.active ? 'true' : 'false');
      li.appendChild(el('span', 'shortcut', '/' + item.shortcut));
      li.appendChild(el('span', 'pick-text', item.text));
      li.addEventListener('click', function () { P.active = i; insertPick(); });
      ul.appendChild(li);
    });
    var active = P.items.length ? $('pick-' + P.active) : null;
    if (active) {
      box.setAttribute('aria-activedescendant', active.id);
      active.scrollIntoView({ block: 'nearest' });
    }
    $('picker-note').textContent = P.items.length ? t('pickerKeys')
      : P.loading ? t('loading') : t('noSaved', P.q);
  }

  function insertPick() {
    var P = S.picker;
    var item = P.items[P.active];
    if (!item) return;
    var box = $('text');
    box.focus();
    box.setRangeText(item.text, P.from, P.to, 'end');
    closePicker();
    updateChars();
  }

  function pickerButton() {
    var box = $('text');
    box.focus();
    if (!box.value) {
      box.value = '/';
      box.setSelectionRange(1, 1);
      onComposerInput();
    } else {
      openPicker('', box.selectionStart, box.selectionEnd); // inserts at the caret
    }
  }

  // Keys while the picker is open; true when the key was the picker's.
  function pickerKey(ev) {
    var P = S.picker;
    if (!P.open || ev.isComposing) return false;
    var n = P.items.length;
    if (ev.key === 'ArrowDown' || ev.key === 'ArrowUp') {
      ev.preventDefault();
      if (n) P.active = (P.active + (ev.key === 'ArrowDown' ? 1 : -1) + n) % n;
      renderPicker();
      return true;
    }
    // Ctrl+Enter too: a half-typed "/shortcut" is never what the person meant to send.
    if (ev.key === 'Enter' && !ev.shiftKey && !ev.altKey && n) {
      ev.preventDefault();
      insertPick();
      return true;
    }
    if (ev.key === 'Escape') {
      ev.preventDefault();
      closePicker();
      return true;
    }
    return false;
  }

  // -- satisfaction ------------------------------------------------------------------------------

  function stars(rating) {
    var n = Math.max(0, Math.min(5, Math.round(rating)));
    return '★★★★★'.slice(0, n) + '☆☆☆☆☆'.slice(0, 5 - n);
  }

  function showStars(e, rating) {
    e.textContent = stars(rating);
    e.title = t('rated', rating);
    e.setAttribute('role', 'img');
    e.setAttribute('aria-label', t('rated', rating));
  }

  function ratingStars(rating) {
    var e = el('span', 'stars');
    showStars(e, rating);
    return e;
  }

  // -- pages: the inbox and the report (#report) ------------------------------------------------

  function pageFromHash() { return window.location.hash === '#report' ? 'report' : 'inbox'; }

  function showPage(page) {
    S.page = page;
    var on = !!S.me;
    $('desk').hidden = !on || page !== 'inbox';
    $('report').hidden = !on || page !== 'report';
    document.querySelectorAll('#pages [data-page]').forEach(function (a) {
      if (a.dataset.page === page) a.setAttribute('aria-current', 'page');
      else a.removeAttribute('aria-current');
    });
    if (on && page === 'report') loadReport();
  }

  async function loadReport() {
    var seq = ++S.reportSeq;
    var table = $('r-table');
    $('r-error').textContent = '';
    table.setAttribute('aria-busy', 'true');
    try {
      var got = await api('GET', '/report?days=' + encodeURIComponent($('r-days').value));
      if (seq !== S.reportSeq) return;
      S.report = got.days || [];
      renderReport();
    } catch (e) {
      if (seq === S.reportSeq && e.status !== 401) $('r-error').textContent = errorText(e);
    } finally {
      if (seq === S.reportSeq) table.removeAttribute('aria-busy');
    }
  }

  function percent(x) { return x == null ? '—' : Math.round(x * 100) + '%'; }

  function dayText(day) {
    var d = new Date(day + 'T00:00:00Z');
    if (isNaN(d.getTime())) return day;
    return new Intl.DateTimeFormat(S.lang === 'zh' ? 'zh-CN' : 'en-GB',
      { timeZone: 'UTC', weekday: 'short', month: 'short', day: 'numeric' }).format(d);
  }

  function ratingsText(n) { return n === 1 ? t('oneRating') : t('ratingsCount', n); }

  function reportRow(r, first, span) {
    var tr = el('tr', first ? 'first' : null);
    if (first) {
      var th = el('th', 'day', dayText(r.day));
      th.scope = 'row';
      th.rowSpan = span;
      tr.appendChild(th);
    }
    tr.appendChild(el('td', 'chan', channelName(r.channel)));
    tr.appendChild(el('td', 'num', String(r.conversations)));
    tr.appendChild(el('td', 'num',
      r.conversations ? percent(r.bot_alone_share) + ' (' + r.bot_alone + ')' : '—'));
    var reasons = el('td', 'reasons');
    Object.keys(r.handoffs || {}).sort().forEach(function (reason) {
      var label = TEXTS['short_' + reason] ? t('short_' + reason) : reason;
      var chip = el('span', 'chip', label + ' ' + r.handoffs[reason]);
      chip.title = reasonText(reason);
      reasons.appendChild(chip);
    });
    if (!reasons.childNodes.length) reasons.textContent = '—';
    tr.appendChild(reasons);
    tr.appendChild(el('td', 'num', r.first_reply_p50_s == null ? '—' : duration(r.first_reply_p50_s)));
    tr.appendChild(el('td', 'num', r.first_reply_p90_s == null ? '—' : duration(r.first_reply_p90_s)));
    var sat = el('td', 'num sat');
    if (r.satisfaction == null) sat.textContent = '—';
    else {
      sat.appendChild(el('span', 'stars', r.satisfaction.toFixed(1) + ' ★'));
      sat.appendChild(el('span', 'muted', ' (' + ratingsText(r.ratings) + ')'));
    }
    tr.appendChild(sat);
    return tr;
  }

  function renderReport() {
    var rows = S.report;
    if (!rows) return;
    var body = $('r-body');
    body.textContent = '';
    // Newest day first, its channels under it.
    var byDay = {};
    rows.forEach(function (r) { (byDay[r.day] = byDay[r.day] || []).push(r); });
    Object.keys(byDay).sort().reverse().forEach(function (day) {
      byDay[day].forEach(function (r, i) { body.appendChild(reportRow(r, i === 0, byDay[day].length)); });
    });
    $('r-empty').hidden = rows.length > 0;
    $('r-table').hidden = rows.length === 0;
    $('r-totals').textContent = totalsText(rows);
  }

  function totalsText(rows) {
    var conversations = 0, alone = 0, handoffs = 0, ratings = 0, sum = 0;
    rows.forEach(function (r) {
      conversations += r.conversations;
      alone += r.bot_alone;
      Object.keys(r.handoffs || {}).forEach(function (k) { handoffs += r.handoffs[k]; });
      if (r.satisfaction != null) { ratings += r.ratings; sum += r.satisfaction * r.ratings; }
    });
    var parts = [conversations === 1 ? t('oneConversation') : t('totalConversations', conversations)];
    if (conversations) parts.push(t('totalBotAlone', percent(alone / conversations)));
    parts.push(t('totalHandoffs', handoffs));
    if (ratings) {
      parts.push(t('totalRating', (sum / ratings).toFixed(1) + ' ★ (' + ratingsText(ratings) + ')'));
    }
    return parts.join(' · ');
  }

  // -- toasts and the clock --------------------------------------------------------------------

  var toastTimer = null;
  function toast(text, bad) {
    var e = $('toast');
    e.textContent = text;
    e.className = 'toast' + (bad ? ' bad' : '');
    e.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(function () { e.hidden = true; }, 4000);
  }

  function tick() {
    document.querySelectorAll('#list .item').forEach(function (li) {
      var c = S.list.find(function (x) { return String(x.id) === li.dataset.id; });
      var age = li.querySelector('.age');
      if (c && age) age.textContent = ageText(c);
    });
  }

  // -- keys --------------------------------------------------------------------------------------

  function onKey(ev) {
    if (!S.me) return;
    var target = ev.target;
    if (target && target.id === 'text') {
      if (pickerKey(ev)) return;
      if (ev.key === 'Enter' && (ev.ctrlKey || ev.metaKey)) {
        ev.preventDefault();
        write('reply');
      } else if (ev.key === 'Escape') {
        var li = S.selected != null && $('conv-' + S.selected);
        (li || $('list')).focus();
      }
      return;
    }
    if (typing(target) || ev.ctrlKey || ev.metaKey || ev.altKey || S.page !== 'inbox') return;
    var inList = target && target.closest && target.closest('#list');
    if (ev.key === 'j' || (inList && ev.key === 'ArrowDown')) { ev.preventDefault(); move(1); }
    else if (ev.key === 'k' || (inList && ev.key === 'ArrowUp')) { ev.preventDefault(); move(-1); }
    else if (ev.key === 'r' && S.conv) { ev.preventDefault(); $('text').focus(); }
    else if (ev.key === 's' && S.conv) { ev.preventDefault(); suggest(); }
    else if (inList && ev.key === 'Enter' && S.conv) { ev.preventDefault(); $('text').focus(); }
  }

  function onTabKey(ev) {
    var tabs = Array.prototype.slice.call(document.querySelectorAll('.views [role=tab]'));
    var i = tabs.indexOf(ev.target);
    if (i < 0) return;
    var step = ev.key === 'ArrowRight' ? 1 : ev.key === 'ArrowLeft' ? -1 : 0;
    if (!step) return;
    ev.preventDefault();
    var next = tabs[(i + step + tabs.length) % tabs.length];
    next.focus();
    setView(next.dataset.view);
  }

  // -- start -------------------------------------------------------------------------------------

  async function start() {
    var saved = store('lang');
    var nav = (navigator.language || 'en').toLowerCase();
    setLang(saved || (nav.indexOf('zh') === 0 ? 'zh' : 'en'));
    $('lang').addEventListener('click', function () {
      var next = S.lang === 'zh' ? 'en' : 'zh';
      store('lang', next);
      setLang(next);
    });
    $('signin-form').addEventListener('submit', signIn);
    $('signout').addEventListener('click', signOut);
    document.querySelectorAll('.views [role=tab]').forEach(function (b) {
      b.addEventListener('click', function () { setView(b.dataset.view); });
      b.addEventListener('keydown', onTabKey);
    });
    $('f-channel').addEventListener('change', function (ev) {
      S.channel = ev.target.value;
      S.known = null;
      refresh();
    });
    var typingTimer = null;
    $('f-account').addEventListener('input', function (ev) {
      clearTimeout(typingTimer);
      typingTimer = setTimeout(function () {
        S.account = ev.target.value.trim();
        S.known = null;
        refresh();
      }, 300);
    });
    document.querySelectorAll('[data-act]').forEach(function (b) {
      b.addEventListener('click', function () { act(b.dataset.act); });
    });
    $('assign').addEventListener('click', function () {
      var id = +$('assignee').value;
      if (id) act('assign', { agent_id: id });
      else $('assignee').focus();
    });
    $('composer').addEventListener('submit', function (ev) { ev.preventDefault(); write('reply'); });
    $('note').addEventListener('click', function () { write('note'); });
    $('text').addEventListener('input', onComposerInput);
    $('text').addEventListener('blur', function () {
      // Leaving the box closes the picker (a click on an answer keeps the focus: see there).
      setTimeout(function () { if (document.activeElement !== $('text')) closePicker(); }, 0);
    });
    // A click in the picker picks without taking the focus from the reply box.
    $('picker').addEventListener('mousedown', function (ev) { ev.preventDefault(); });
    $('suggest').addEventListener('click', suggest);
    $('canned').addEventListener('click', pickerButton);
    window.addEventListener('hashchange', function () {
      showPage(pageFromHash());
      if (S.page === 'report') $('r-title').focus();
    });
    $('r-days').addEventListener('change', loadReport);
    $('r-refresh').addEventListener('click', loadReport);
    $('more').addEventListener('click', function () {
      if (S.selected != null && S.firstSeq != null) loadMessages(S.selected, S.firstSeq);
    });
    $('list').addEventListener('focus', function (ev) {
      // The list itself gets focus only to hand it to its current row.
      if (ev.target !== $('list')) return;
      var row = $('list').querySelector('[tabindex="0"]');
      if (row) row.focus();
    });
    document.addEventListener('keydown', onKey);
    setInterval(tick, 10000);
    setInterval(function () { if (S.me) scheduleRefresh(); }, 30000); // overdue flags
    setView('waiting');
    try {
      signedIn(await api('GET', '/session'));
    } catch (e) {
      signedOut(e.status === 401 || e.code === 'unauthenticated' ? '' : errorText(e));
    }
  }

  window.SwarmDeskConsole = { _state: S };
  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
