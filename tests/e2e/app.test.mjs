// The end-to-end scenario of the desktop app, run by tests/e2e/run (which starts Xvfb, the fake
// hub and tauri-driver, and passes their whereabouts in E2E_* variables): download, chat,
// restart, continue; then kill -9 while an answer streams, start again, continue; then started with
// `--model` on the offline demo (SmolLM2 + its distilled memory), a real answer, and the same
// question asked over the app's local OpenAI-compatible API server. Each step is a test;
// after a failure the later steps are skipped (they build on it) and a screenshot of the window
// is written to target/e2e/failure-<step>.png.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { Builder, By, Key, until } from 'selenium-webdriver';

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set: run tests/e2e/run`);
  return v;
};
const DRIVER_URL = env('E2E_DRIVER_URL');
const DRIVER_PID = Number(env('E2E_DRIVER_PID'));
const APP = env('E2E_APP');
const APP_LOG = env('E2E_APP_LOG');
const OUT = env('E2E_OUT');
const REPO = env('E2E_REPO');
const VARIANTS = env('E2E_VARIANTS').split(/\s+/);
const DB = path.join(env('E2E_DATA_DIR'), 'conversations.sqlite3');
/** The offline demo (assets/demo-memory, its base fetched into models/), as scripts/run.sh opens it. */
const DEMO = env('E2E_DEMO');
const DEMO_VARIANT = env('E2E_DEMO_VARIANT');
/** A question with a known answer: SmolLM2-135M-Instruct with the demo's memory, greedy. */
const DEMO_QUESTION = 'What is the capital of France?';
// The first download becomes the model in use by itself; the second is picked with "Use".
const [FIRST_VARIANT, VARIANT] = VARIANTS;

const FIRST_MESSAGE = 'Hello tiny model, tell me about gardens';
const SECOND_MESSAGE = 'And what about the rivers nearby?';
const VERSION_MESSAGE = 'Which one is the longest?';
const BRANCH_MESSAGE = 'What grows there in spring?';
const MEMORY_NAME = 'Gardens and rivers';
const MEMORY_QUESTION = 'What do you remember about gardens?';
const DOCUMENT_QUESTION = 'Where does the path turn?';
const CHAT_SYSTEM_PROMPT = 'Answer in one short sentence.';
const SEARCH = 'gardens';
const LONG_MESSAGE = 'Now tell me everything you know, at length';
/** Messages sent at most until an answer streams past its first save. */
const KILL_ATTEMPTS = 30;
const AFTER_KILL = 'Are you still there?';
/** The reason the store gives an answer the app was killed in the middle of (messages::INTERRUPTED). */
const INTERRUPTED = 'the app closed before this answer was finished; the text saved until then is kept';
/** Most text lost to the kill, as time: the save interval (2 s), plus slack for a loaded machine. */
const MAX_LOST_MS = 3000;

/** The long paste: repeated until the tiny model takes seconds to read it (debug build). */
const PASTE_UNIT = 'A long paste, read block by block while the user watches the progress. ';
const PASTE_CHARS = 80_000;
/** Most of the app's CPU the webview may take while the model reads the paste. */
const MAX_WEBVIEW_SHARE = 0.25;

const WAIT = 30_000; // one UI step (the model is tiny: nothing takes long)
/** Most time a screenshot (and the paint before it) may take before the window counts as hung. */
const SHOT_WAIT = 60_000;
const GENERATION = 120_000; // one answer, model load included

/** @type {import('selenium-webdriver').WebDriver | null} */
let driver = null;
let broken = false;
const seen = { appPid: null, memoryBefore: null, firstAnswer: null, conversationTitle: null, killed: null };

// ---- helpers ----

/** One step of the scenario: skipped after an earlier failure; a screenshot when it fails. */
function step(name, fn, timeout = 180_000) {
  test(name, { timeout }, async (t) => {
    if (broken) {
      t.skip('an earlier step failed');
      return;
    }
    const tag = name.replace(/[^a-z0-9]+/gi, '-').toLowerCase();
    try {
      await fn(t);
    } catch (err) {
      broken = true;
      // A screenshot that hangs too (a wedged webview) must not hold the step: bounded, and
      // the processes' stacks are written first.
      if (/timed out|hangs/.test(String(err))) dumpStacks(`failure-${tag}`);
      await withTimeout(rawShot(`failure-${tag}`), SHOT_WAIT, 'the failure screenshot').catch(() => {});
      throw err;
    }
  });
}

/** `promise`, or an error naming `what` once `ms` have passed (WebDriver calls have no timeout). */
async function withTimeout(promise, ms, what) {
  let timer;
  const late = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} timed out after ${ms} ms (it hangs)`)), ms);
  });
  try {
    return await Promise.race([promise, late]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * The stacks of every thread of the processes under tauri-driver (the app, its WebKit web
 * process, WebKitWebDriver), by gdb, into target/e2e/stacks-TAG-PID.txt: what a hang was
 * waiting for. Skipped without gdb.
 */
function dumpStacks(tag) {
  const parent = parents();
  const pids = [...parent.keys()].filter((pid) => {
    for (let p = parent.get(pid); p && p > 1; p = parent.get(p)) if (p === DRIVER_PID) return true;
    return false;
  });
  for (const pid of pids) {
    let exe = '?';
    try {
      exe = fs.readlinkSync(`/proc/${pid}/exe`);
      const out = execFileSync('gdb', ['-p', String(pid), '-batch', '-ex', 'thread apply all bt 30'], {
        encoding: 'utf8',
        timeout: 60_000,
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      fs.writeFileSync(path.join(OUT, `stacks-${tag}-${pid}.txt`), `${exe}\n${out}`);
    } catch (e) {
      fs.writeFileSync(path.join(OUT, `stacks-${tag}-${pid}.txt`), `${exe}\nno stacks: ${e.message}\n`);
    }
  }
}

/**
 * A screenshot of the window as target/e2e/NAME.png, once the screen is settled: no error notice
 * on screen (that fails the step), confirmations dismissed so they hide nothing.
 */
async function shot(name) {
  const errors = await driver.findElements(css('[data-testid="notice"][role="alert"]'));
  if (errors.length) assert.fail(`an error notice is shown: ${await errors[0].getText()}`);
  for (const close of await driver.findElements(css('[data-testid="notice"][role="status"] button[aria-label="Dismiss"]'))) {
    await close.click().catch(() => {}); // it may have faded meanwhile
  }
  await waitFor(async () => (await driver.findElements(css('[data-testid="notice"]'))).length === 0, 'the notices are gone');
  await withTimeout(painted(), SHOT_WAIT, `painting the window for ${name}.png`);
  await withTimeout(rawShot(name), SHOT_WAIT, `the screenshot ${name}.png`);
}

/** Waits until the page has painted what the DOM holds (a WebDriver screenshot shows the last paint). */
async function painted() {
  await driver.executeAsyncScript(`
    const done = arguments[arguments.length - 1];
    requestAnimationFrame(() => requestAnimationFrame(() => setTimeout(done, 250)));
  `);
}

async function rawShot(name) {
  if (!driver) return;
  // WebKit answers a screenshot after the page's next rendering update. A page where nothing
  // moves (the app animates nothing while a CPU-only machine computes) may not have one, and the
  // screenshot then waits forever with every process idle (seen: gdb stacks of the app, its web
  // process and WebKitWebDriver all in their main loops). A one-pixel, all but transparent
  // element in a corner, changed every 100 ms while the screenshot is taken, gives it one.
  await driver.executeScript(`
    let el = document.getElementById('e2e-repaint');
    if (!el) {
      el = document.createElement('div');
      el.id = 'e2e-repaint';
      el.style.cssText = 'position:fixed;left:0;top:0;width:1px;height:1px;opacity:0.01;pointer-events:none';
      document.body.appendChild(el);
    }
    let on = false;
    clearInterval(window.__e2eRepaint);
    window.__e2eRepaint = setInterval(() => { on = !on; el.style.background = on ? '#000' : '#fff'; }, 100);
  `);
  let shotB64;
  try {
    shotB64 = await driver.takeScreenshot();
  } finally {
    await driver
      .executeScript(`clearInterval(window.__e2eRepaint); document.getElementById('e2e-repaint')?.remove();`)
      .catch(() => {});
  }
  const png = Buffer.from(shotB64, 'base64');
  assert.ok(png.subarray(1, 4).toString() === 'PNG', 'a PNG screenshot');
  fs.writeFileSync(path.join(OUT, `${name}.png`), png);
}

const css = (selector) => By.css(selector);
async function find(selector, timeout = WAIT) {
  return driver.wait(until.elementLocated(css(selector)), timeout, `no element ${selector} within ${timeout} ms`);
}
/** The first displayed element matching `selector`, or null. */
async function displayed(selector) {
  for (const el of await driver.findElements(css(selector))) if (await el.isDisplayed()) return el;
  return null;
}
/** Waits for a displayed element, found afresh each time (the UI re-renders under our feet). */
async function findVisible(selector, timeout = WAIT) {
  return waitFor(async () => (await displayed(selector)) ?? false, `no visible ${selector} within ${timeout} ms`, timeout);
}
/** Waits until `fn` returns a truthy value (exceptions count as "not yet": the DOM moves). */
async function waitFor(fn, message, timeout = WAIT) {
  return driver.wait(async () => {
    try {
      return await fn();
    } catch {
      return false;
    }
  }, timeout, message);
}
async function click(selector) {
  await waitFor(async () => {
    const el = await displayed(selector);
    if (!el || !(await el.isEnabled())) return false;
    await el.click();
    return true;
  }, `${selector} cannot be clicked`);
}
async function scrollTo(el) {
  await driver.executeScript('arguments[0].scrollIntoView({ block: "center" })', el);
}
/**
 * An element's text from the DOM. WebKitWebDriver's getText answers "" for the titles (one line,
 * cut with an ellipsis by CSS), which made every comparison of titles pass vacuously.
 */
async function textOf(el) {
  return (await driver.executeScript('return arguments[0].textContent', el)).trim();
}

/** The open chat's title (see `textOf`). */
async function chatTitle() {
  return textOf(await find('[data-testid="chat-title"]'));
}

async function setField(selector, value) {
  const el = await findVisible(selector);
  await el.clear();
  await el.sendKeys(String(value));
}

/** The fields of a /proc stat file after the command name (field 3 on), or null when gone. */
function statFields(path) {
  try {
    const stat = fs.readFileSync(path, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  } catch {
    return null; // gone meanwhile
  }
}

/** Every process's parent, from /proc. */
function parents() {
  const parent = new Map();
  for (const d of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    const fields = statFields(`/proc/${d}/stat`);
    if (fields) parent.set(Number(d), Number(fields[1]));
  }
  return parent;
}

/** PIDs of the app binary among tauri-driver's descendants (from /proc). */
function appPids() {
  const parent = parents();
  const under = (pid) => {
    for (let p = parent.get(pid); p && p > 1; p = parent.get(p)) if (p === DRIVER_PID) return true;
    return false;
  };
  const app = fs.realpathSync(APP);
  return [...parent.keys()].filter((pid) => {
    try {
      return under(pid) && fs.readlinkSync(`/proc/${pid}/exe`) === app;
    } catch {
      return false;
    }
  });
}

/** The app's log (tauri-driver's output: the app inherits its stderr), one entry per start. */
function appRuns() {
  const text = fs.readFileSync(APP_LOG, 'utf8').replace(/\x1b\[[0-9;]*m/g, '');
  const runs = text.split(/^(?=.*tptt_chat: starting)/m).filter((r) => /tptt_chat: starting/.test(r));
  return runs;
}

/** Starts the app (with these command-line arguments) in a new WebDriver session; its PID. */
async function startApp(args = []) {
  // tauri-driver answers once it listens; it may still be starting when the first step runs.
  await waitForDriver();
  driver = await new Builder()
    .usingServer(DRIVER_URL)
    .withCapabilities({ browserName: 'wry', 'tauri:options': { application: APP, args } })
    .build();
  await driver.manage().setTimeouts({ implicit: 0, pageLoad: WAIT, script: WAIT });
  await find('[data-testid="nav-models"]');
  const pids = appPids();
  assert.equal(pids.length, 1, `one app process runs under the driver (found ${pids})`);
  return pids[0];
}

async function waitForDriver() {
  const deadline = Date.now() + WAIT;
  for (;;) {
    try {
      const r = await fetch(`${DRIVER_URL}/status`);
      if (r.ok) return;
    } catch {
      // not listening yet
    }
    if (Date.now() > deadline) throw new Error(`tauri-driver does not answer at ${DRIVER_URL}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

/** Rows of `sql` on the app's database, read with the sqlite3 tool (a second reader of its WAL). */
function dbRows(sql) {
  const out = execFileSync('sqlite3', ['-json', DB, sql], { encoding: 'utf8' });
  return out.trim() ? JSON.parse(out) : [];
}

/** Saves settings with this answer length (the settings screen). */
async function setMaxNewTokens(n) {
  await saveSettings({ 'sampling-maxNewTokens': n });
}

/** Sets fields of the settings screen (by data-testid), saves, and goes back to the chat. */
async function saveSettings(fields) {
  await click('[data-testid="nav-settings"]');
  for (const [testid, value] of Object.entries(fields)) await setField(`[data-testid="${testid}"]`, value);
  await click('[data-testid="save-settings"]');
  await waitFor(
    async () => !(await (await find('[data-testid="save-settings"]')).isEnabled()),
    'the settings are saved (nothing left to save)',
  );
  await click('[data-testid="nav-chat"]');
}

/** Kills the app with SIGKILL (no shutdown of any kind), then ends the dead WebDriver session. */
async function killApp(pid) {
  process.kill(pid, 'SIGKILL');
  const d = driver;
  driver = null;
  // The session's browser is gone: ending it may fail or hang; either way it is over.
  await Promise.race([d.quit().catch(() => {}), new Promise((r) => setTimeout(r, 10_000))]);
  const deadline = Date.now() + WAIT;
  while (appPids().includes(pid)) {
    if (Date.now() > deadline) throw new Error(`the app (${pid}) still runs after SIGKILL`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

async function stopApp() {
  const d = driver;
  driver = null;
  await withTimeout(d.quit(), WAIT, 'ending the WebDriver session');
  const deadline = Date.now() + WAIT;
  while (appPids().length > 0) {
    if (Date.now() > deadline) {
      dumpStacks('still-running');
      throw new Error(`the app is still running after the session ended: ${appPids()} (stacks in target/e2e/stacks-still-running-*.txt)`);
    }
    await new Promise((r) => setTimeout(r, 200));
  }
}

/**
 * Records, from inside the page, what the live answer and the memory meter show while an answer
 * streams (a MutationObserver sees every DOM update, however fast the tokens come).
 */
async function watchStreaming() {
  await driver.executeScript(`
    const rec = { texts: [], tokens: [], memory: [] };
    window.__e2eStream = rec;
    const read = () => {
      const live = document.querySelector('[data-testid="message"][data-status="streaming"]');
      if (!live) return;
      const text = live.querySelector('[data-testid="message-body"]')?.textContent ?? '';
      if (text.trim() && rec.texts.at(-1) !== text) rec.texts.push(text);
      const tokens = live.querySelector('[data-testid="stats"]')?.textContent ?? '';
      if (tokens && rec.tokens.at(-1) !== tokens) rec.tokens.push(tokens);
      const meter = document.querySelector('[data-testid="memory-meter"] [role="meter"]');
      if (meter) {
        const fill = Number(meter.getAttribute('aria-valuenow'));
        const more = document.querySelector('[data-testid="memory-recurrent"]')?.textContent ?? '';
        const m = /([\\d,]+) earlier/.exec(more);
        const total = fill + (m ? Number(m[1].replace(/,/g, '')) : 0);
        if (rec.memory.at(-1) !== total) rec.memory.push(total);
      }
    };
    new MutationObserver(read).observe(document.body, { subtree: true, childList: true, characterData: true, attributes: true });
  `);
}
const streamRecord = () => driver.executeScript('return window.__e2eStream');

/** The memory meter's total (window fill + recurrent-only tokens), or null without a meter. */
async function memoryTotal() {
  return driver.executeScript(`
    const meter = document.querySelector('[data-testid="memory-meter"] [role="meter"]');
    if (!meter) return null;
    const more = document.querySelector('[data-testid="memory-recurrent"]')?.textContent ?? '';
    const m = /([\\d,]+) earlier/.exec(more);
    return Number(meter.getAttribute('aria-valuenow')) + (m ? Number(m[1].replace(/,/g, '')) : 0);
  `);
}

/**
 * The live stats lines ("… N tokens") seen while streaming count up, at least twice (a line may
 * change without its count: the model's load time, the TTFT appear).
 */
function assertCountsUp(lines) {
  const all = lines.map((l) => Number(/([\d,]+) tokens/.exec(l)?.[1].replace(/,/g, '') ?? NaN));
  const counts = all.filter((c, i) => i === 0 || c !== all[i - 1]);
  assert.ok(counts.length >= 3 && counts.every((c, i) => Number.isFinite(c) && (i === 0 || c > counts[i - 1])),
    `the live token count went up while the answer streamed: ${JSON.stringify(lines.slice(0, 5))} … (${lines.length})`);
}

/** Sends `text` from the composer and waits for the answer to finish streaming. */
async function sendAndAwaitAnswer(text, answersBefore) {
  await watchStreaming();
  const box = await findVisible('[data-testid="composer"]');
  await box.sendKeys(text);
  await box.sendKeys(Key.ENTER);
  const answers = '[data-testid="message"][data-role="assistant"]';
  await waitFor(
    async () => (await driver.findElements(css(answers))).length === answersBefore + 1,
    'the answer appears',
  );
  // Found afresh each time: the element is re-created when the message gets its stored id.
  const answer = async () => (await driver.findElements(css(answers)))[answersBefore];
  const status = await waitFor(
    async () => {
      const s = await (await answer()).getAttribute('data-status');
      return s !== 'streaming' && s;
    },
    'the answer finishes',
    GENERATION,
  );
  assert.equal(status, 'complete', 'the answer completed');
  const body = await (await answer()).findElement(css('[data-testid="message-body"]')).getText();
  assert.ok(body.trim().length > 0, 'the answer has text');
  return { body, record: await streamRecord() };
}

/** Clock ticks (user + system) a process or thread has used, from its /proc stat file. */
function ticks(statPath) {
  const fields = statFields(statPath);
  return fields ? Number(fields[11]) + Number(fields[12]) : 0; // utime, stime (fields 14 and 15)
}

/** PIDs of `pid`'s descendants (the webview's WebKit processes are the app's children). */
function descendantsOf(pid) {
  const children = new Map();
  for (const [child, ppid] of parents()) children.set(ppid, [...(children.get(ppid) ?? []), child]);
  const out = [];
  const walk = (p) => (children.get(p) ?? []).forEach((c) => (out.push(c), walk(c)));
  walk(pid);
  return out;
}

/**
 * The app's CPU split now: the model (the app's threads but its main one) and the webview (the
 * main thread, where GTK and the webview's UI side run, and WebKit's processes), in clock ticks.
 */
function cpuSplit(appPid) {
  const main = ticks(`/proc/${appPid}/task/${appPid}/stat`);
  const app = ticks(`/proc/${appPid}/stat`);
  const webkit = descendantsOf(appPid).reduce((n, p) => n + ticks(`/proc/${p}/stat`), 0);
  return { model: app - main, webview: main + webkit };
}

// ---- the scenario ----

after(async () => {
  // Bounded: after a hang the session may never end (the app is killed with tauri-driver).
  if (driver) await withTimeout(driver.quit(), WAIT, 'ending the WebDriver session').catch(() => {});
});

step('the app starts with no model and offers the model manager', async () => {
  seen.appPid = await startApp();
  await findVisible('[data-testid="no-model"]');
  await click('[data-testid="open-models"]');
  await findVisible('#models-title');
});

step('adds the repository by id and lists its variants', async () => {
  const input = await findVisible('[data-testid="add-repo"]');
  await input.sendKeys(REPO, Key.ENTER);
  const card = `[data-testid="model-card"][data-repo="${REPO}"]`;
  await scrollTo(await findVisible(card));
  // Adding lists the variants (the hub's file listing); the button is there until they come.
  await waitFor(async () => {
    if ((await driver.findElements(css(`${card} [data-testid="variant"]`))).length > 0) return true;
    const list = await driver.findElements(css(`${card} [data-testid="list-variants"]`));
    if (list.length && (await list[0].isEnabled())) await list[0].click();
    return false;
  }, 'the variants are listed');
  const names = await driver.executeScript(
    `return [...document.querySelectorAll(arguments[0])].map((e) => e.dataset.variant)`,
    `${card} [data-testid="variant"]`,
  );
  assert.deepEqual([...names].sort(), [...VARIANTS].sort(), 'the variants the hub serves');
});

const rowOf = (variant) => `[data-testid="model-card"][data-repo="${REPO}"] [data-testid="variant"][data-variant="${variant}"]`;

step('downloads a variant, its progress shown', async () => {
  const row = rowOf(FIRST_VARIANT);
  await driver.executeScript(`
    const rec = [];
    window.__e2eProgress = rec;
    new MutationObserver(() => {
      const bar = document.querySelector(arguments[0] + ' [role="progressbar"]');
      const bytes = document.querySelector(arguments[0] + ' [data-testid="download-bytes"]')?.textContent;
      const speed = document.querySelector(arguments[0] + ' [data-testid="download-speed"]')?.textContent ?? null;
      if (bar && bytes && rec.at(-1)?.bytes !== bytes) rec.push({ percent: Number(bar.getAttribute('aria-valuenow')), bytes, speed });
    }).observe(document.body, { subtree: true, childList: true, characterData: true, attributes: true });
  `, row);
  await click(`${row} [data-testid="variant-download"]`);
  // Mid-way (the fake hub sends the base weights slowly): the progress bar, bytes and speed.
  await waitFor(async () => {
    const rec = await driver.executeScript('return window.__e2eProgress');
    return rec.some((r) => r.percent > 0 && r.percent < 100 && r.speed);
  }, 'a progress reading between 0 and 100 % with a speed');
  await scrollTo(await find(row));
  await shot('models-downloading');
  // The first variant downloaded becomes the one in use.
  await findVisible(`${row} [data-testid="variant-in-use"]`, GENERATION);
  const rec = await driver.executeScript('return window.__e2eProgress');
  assert.ok(rec.length >= 3, `several progress readings: ${JSON.stringify(rec)}`);
  const percents = rec.map((r) => r.percent);
  assert.ok(percents.every((p, i) => i === 0 || p >= percents[i - 1]), `progress never goes back: ${percents}`);
});

step('downloads another variant (its base is shared) and picks it', async () => {
  const row = rowOf(VARIANT);
  await click(`${row} [data-testid="variant-download"]`);
  await click(`${row} [data-testid="variant-use"]`);
  await findVisible(`${row} [data-testid="variant-in-use"]`);
  await findVisible(`${rowOf(FIRST_VARIANT)} [data-testid="variant-downloaded"]`);
  await scrollTo(await find(row));
  await shot('models');
});

step('settings: the model is chosen; an answer length and a seed are saved', async () => {
  await click('[data-testid="nav-settings"]');
  const model = await findVisible('[data-testid="settings-model"]');
  await waitFor(async () => (await model.getAttribute('value')) === REPO, 'the chosen model in settings');
  assert.equal(await (await find('[data-testid="settings-variant"]')).getAttribute('value'), VARIANT);
  await setField('[data-testid="sampling-maxNewTokens"]', 256);
  await setField('[data-testid="sampling-seed"]', 7);
  await click('[data-testid="save-settings"]');
  await waitFor(
    async () => !(await (await find('[data-testid="save-settings"]')).isEnabled()),
    'the settings are saved (nothing left to save)',
  );
  await scrollTo(await find('[data-testid="sampling-topK"]'));
  await shot('settings');
});

step('sends a message and sees the answer stream in', async (t) => {
  await click('[data-testid="nav-chat"]');
  await waitFor(
    async () => (await (await find('[data-testid="model-chip-variant"]')).getText()) === VARIANT,
    'the chat shows the chosen variant',
  );
  const { body, record } = await sendAndAwaitAnswer(FIRST_MESSAGE, 0);
  // Streamed: while the answer was live, its token counter was seen counting up, token by token
  // (the text itself is painted once per animation frame, so a fast answer may show little of
  // it before it completes: reported, not required).
  assertCountsUp(record.tokens);
  t.diagnostic(
    `while streaming: ${record.tokens.length} token counts (${record.tokens.at(0)} … ${record.tokens.at(-1)}), ` +
      `${record.texts.length} partial texts painted`,
  );
  seen.firstAnswer = body;
  const user = await find('[data-testid="message"][data-role="user"] [data-testid="message-body"]');
  assert.equal(await user.getText(), FIRST_MESSAGE);
  // The memory meter counts what the conversation read.
  seen.memoryBefore = await waitFor(async () => (await memoryTotal()) || false, 'the memory meter shows the memory');
  // The conversation is in the list, titled from the first message.
  const item = await findVisible('[data-testid="conversation"] [data-testid="conversation-title"]');
  seen.conversationTitle = await textOf(item);
  assert.ok(seen.conversationTitle, 'the conversation has a title');
  assert.ok(FIRST_MESSAGE.startsWith(seen.conversationTitle.replace(/…$/, '')), `title: ${seen.conversationTitle}`);
  await shot('chat-first-answer');
  const log = appRuns().at(-1);
  assert.match(log, /no snapshot for this model: the memory is built from the text/, 'a new chat reads from the text');
}, 240_000);

step('the app stops', async () => {
  await stopApp();
});

step('the app starts again on the same data and lists the conversation', async () => {
  const pid = await startApp();
  assert.notEqual(pid, seen.appPid, 'a new app process');
  assert.equal(appRuns().length, 2, 'the log holds two starts');
  await waitFor(async () => (await driver.findElements(css('[data-testid="conversation"]'))).length === 1, 'one conversation listed');
  // The app reopens the chat that was open when it closed; leave it for a new one, then find it
  // in the list by searching for a word of its first message, and open it from there.
  await findVisible('[data-testid="message-list"]');
  await click('[data-testid="new-chat"]');
  await findVisible('[data-testid="welcome"]');
  await setField('[data-testid="search"]', SEARCH);
  const title = await findVisible('[data-testid="conversation"] [data-testid="conversation-title"]');
  assert.equal(await textOf(title), seen.conversationTitle);
  await waitFor(async () => (await driver.findElements(css('[data-testid="conversation"]'))).length === 1, 'one match');
  await shot('conversations');
});

step('continues the conversation from its saved state', async (t) => {
  await click('[data-testid="conversation"] .conversation-open');
  await waitFor(
    async () => (await chatTitle()) === seen.conversationTitle,
    'the conversation opens',
  );
  const answers = '[data-testid="message"][data-role="assistant"] [data-testid="message-body"]';
  const first = await findVisible(answers);
  assert.equal(await first.getText(), seen.firstAnswer, 'the first answer, as saved');
  // The memory meter shows the saved memory (from the snapshot) before anything is sent.
  await waitFor(async () => (await memoryTotal()) === seen.memoryBefore, `the saved memory (${seen.memoryBefore} tokens) is shown`);

  const { record } = await sendAndAwaitAnswer(SECOND_MESSAGE, 1);
  assertCountsUp(record.tokens);
  t.diagnostic(
    `memory: ${seen.memoryBefore} tokens saved; while streaming ${record.memory.length} readings, ` +
      `from ${Math.min(...record.memory)} to ${Math.max(...record.memory)}`,
  );
  // Continued, not re-read: the live meter never fell back to an empty memory...
  assert.ok(
    record.memory.every((m) => m >= seen.memoryBefore),
    `the memory grew from the saved ${seen.memoryBefore} tokens: ${JSON.stringify(record.memory)}`,
  );
  assert.ok((await memoryTotal()) > seen.memoryBefore, 'the memory grew');
  // ...and the backend says it restored the snapshot, and fed only the new turn.
  const log = appRuns().at(-1);
  assert.match(log, /memory restored from its snapshot/, 'the second run restored the snapshot');
  assert.doesNotMatch(log, /memory is built from the text|rebuilding the memory/, 'nothing was re-read');
  const turn = /turn starts.*?read=(\d+)/.exec(log);
  assert.ok(turn && Number(turn[1]) === seen.memoryBefore, `the turn started from the saved position: ${turn?.[0]}`);
  await shot('chat');
}, 240_000);

step('regenerate keeps the old answer as a version: ‹ shows it again and the chat continues from its state', async () => {
  const answers = '[data-testid="message"][data-role="assistant"]';
  const count = (await driver.findElements(css(answers))).length;
  const last = async () => (await driver.findElements(css(answers)))[count - 1];
  const label = async () => {
    const found = await (await last()).findElements(css('[data-testid="version-label"]'));
    return found.length ? (await found[0].getText()).trim() : null;
  };
  const restored = () => (appRuns().at(-1).match(/memory restored from its snapshot/g) ?? []).length;
  const restoredBefore = restored();
  const oldText = await (await (await last()).findElement(css('[data-testid="message-body"]'))).getText();
  await (await (await last()).findElement(css('button[aria-label="Regenerate"]'))).click();
  await waitFor(async () => (await label()) === '2/2', 'the regenerated answer shows 2/2', GENERATION);
  await waitFor(async () => (await (await last()).getAttribute('data-status')) === 'complete', 'the new answer completes', GENERATION);
  const rows = dbRows('SELECT position, version, holder_id IS NULL AS shown FROM versions ORDER BY version');
  assert.deepEqual(rows.map((r) => [r.version, r.shown]), [[1, 0], [2, 1]], JSON.stringify(rows));
  await (await (await last()).findElement(css('[data-testid="version-prev"]'))).click();
  await waitFor(async () => (await label()) === '1/2', 'the old answer shows 1/2');
  const shownText = await (await (await last()).findElement(css('[data-testid="message-body"]'))).getText();
  assert.equal(shownText, oldText, 'the old answer, as it was');
  await shot('alternatives');
  // The next turn continues from the old answer's saved state: restored, nothing re-read.
  await sendAndAwaitAnswer(VERSION_MESSAGE, count);
  const log = appRuns().at(-1);
  assert.ok(restored() >= restoredBefore + 2, `the regenerate and the turn after the switch restored snapshots (${restoredBefore} → ${restored()})`);
  assert.doesNotMatch(log, /memory is built from the text|rebuilding the memory/, 'nothing was re-read');
}, 240_000);

step('branch from here: a new chat continues from the first answer, the original is unchanged', async () => {
  const messages = '[data-testid="message"]';
  const total = (await driver.findElements(css(messages))).length;
  const firstAnswer = (await driver.findElements(css('[data-testid="message"][data-role="assistant"]')))[0];
  await (await firstAnswer.findElement(css('[data-testid="branch"]'))).click();
  await waitFor(async () => (await chatTitle()).endsWith('(branch)'), 'the branch opens').catch(async (err) => {
    throw new Error(`${err.message}: the title is “${await chatTitle()}”`);
  });
  await waitFor(async () => (await driver.findElements(css(messages))).length === 2, 'the branch holds the first turn');
  assert.ok(total > 2, `the original had ${total} messages`);
  await shot('branch');
  // The first answer kept its own state (a snapshot after every turn, its KV window in pages
  // shared with the later turns): the branch's first message continues from it, nothing re-read.
  const [snap] = dbRows(
    `SELECT s.token_count AS tokens FROM snapshots s JOIN conversations c ON c.id = s.conversation_id WHERE c.title LIKE '%(branch)'`,
  );
  assert.ok(snap && snap.tokens > 0, `the branch has the first answer's state: ${JSON.stringify(snap)}`);
  const rebuilt = () => (appRuns().at(-1).match(/memory is built from the text|rebuilding the memory/g) ?? []).length;
  const rebuiltBefore = rebuilt();
  await sendAndAwaitAnswer(BRANCH_MESSAGE, 1);
  const turn = [...appRuns().at(-1).matchAll(/turn starts.*?read=(\d+)/g)].at(-1);
  assert.ok(turn && Number(turn[1]) === snap.tokens, `the branch's turn started from the saved state (${snap.tokens} tokens): ${turn?.[0]}`);
  assert.equal(rebuilt(), rebuiltBefore, 'nothing was re-read');
  // Back to the original, found by its title in the list: whole.
  let original = null;
  await waitFor(async () => {
    for (const item of await driver.findElements(css('[data-testid="conversation"]'))) {
      const title = await textOf(await item.findElement(css('[data-testid="conversation-title"]')));
      if (title === seen.conversationTitle) original = await item.findElement(css('.conversation-open'));
    }
    return original;
  }, 'the original is listed');
  await original.click();
  await waitFor(async () => (await driver.findElements(css(messages))).length === total, 'the original is unchanged');
});

step('a saved memory: saved from the chat, listed in Memories, a new chat starts from it reading only its own text', async () => {
  const restored = async () => {
    let original = null;
    await waitFor(async () => {
      for (const item of await driver.findElements(css('[data-testid="conversation"]'))) {
        const title = await textOf(await item.findElement(css('[data-testid="conversation-title"]')));
        if (title === seen.conversationTitle) original = await item.findElement(css('.conversation-open'));
      }
      return original;
    }, 'the original is listed');
    return original;
  };
  const tokens = await memoryTotal();
  await click('[data-testid="save-memory"]');
  await setField('[data-testid="memory-name"]', MEMORY_NAME);
  await click('[data-testid="memory-save"]');
  await waitFor(async () => dbRows('SELECT COUNT(*) AS n FROM memories')[0].n === 1, 'the memory is recorded');
  await waitFor(async () => !(await (await find('[data-testid="memory-name"]')).isDisplayed()), 'the dialog closes');
  await click('[data-testid="nav-memories"]');
  const name = await findVisible('[data-testid="memory"] [data-testid="memory-name"]');
  assert.equal(await name.getText(), MEMORY_NAME);
  const listed = Number((await (await find('[data-testid="memory-tokens"]')).getText()).replace(/\D/g, ''));
  assert.equal(listed, tokens, 'the memory holds what the chat had read');
  const [row] = dbRows('SELECT token_count, path FROM memories');
  assert.equal(row.token_count, tokens);
  await shot('memories');
  await click('[data-testid="memory-new-chat"]');
  await waitFor(async () => (await chatTitle()) === MEMORY_NAME, 'the new chat opens').catch(async (err) => {
    throw new Error(`${err.message}: the title is “${await chatTitle()}”`);
  });
  await waitFor(async () => (await memoryTotal()) === tokens, `the new chat's meter starts with the memory (${tokens} tokens)`);
  await sendAndAwaitAnswer(MEMORY_QUESTION, 0);
  const log = appRuns().at(-1);
  assert.match(log, /memory started from a saved memory/, 'the turn started from the saved memory');
  const turns = [...log.matchAll(/turn starts.*?read=(\d+) feeding=(\d+)/g)];
  const [, read, feeding] = turns.at(-1);
  assert.equal(Number(read), tokens, 'the turn started from the memory');
  assert.ok(Number(feeding) < tokens, `only the new chat's text was read (${feeding} tokens)`);
  // Back to the original conversation for the steps that follow.
  await (await restored()).click();
  await waitFor(async () => (await chatTitle()) === seen.conversationTitle, 'the original opens').catch(async (err) => {
    throw new Error(`${err.message}: the title is ${JSON.stringify(await chatTitle())}, not ${JSON.stringify(seen.conversationTitle)}`);
  });
}, 240_000);

step("a chat's own settings: a system prompt of its own, and the note that its memory will be rebuilt", async () => {
  const open = async (wanted) => {
    let found = null;
    await waitFor(async () => {
      for (const item of await driver.findElements(css('[data-testid="conversation"]'))) {
        const title = await textOf(await item.findElement(css('[data-testid="conversation-title"]')));
        if (wanted(title)) found = await item.findElement(css('.conversation-open'));
      }
      return found;
    }, 'the conversation is listed');
    await found.click();
  };
  await open((t) => t.endsWith('(branch)'));
  await waitFor(async () => (await chatTitle()).endsWith('(branch)'), 'the branch opens');
  await click('[data-testid="chat-settings"]');
  await findVisible('[data-testid="chat-settings-form"]');
  // The segmented control's radio is drawn by its label (the input itself is not displayed).
  await driver.executeScript('document.querySelector(\'[data-testid="prompt-own"]\').click()');
  await setField('[data-testid="chat-system-prompt"]', CHAT_SYSTEM_PROMPT);
  await findVisible('[data-testid="rebuild-note"]');
  await shot('conversation-settings');
  await click('[data-testid="chat-settings-save"]');
  await waitFor(async () => (await textOf(await find('[data-testid="chat-settings"]'))) === 'Own settings', 'the chip says the chat has its own settings');
  const [row] = dbRows(`SELECT settings FROM conversations WHERE title LIKE '%(branch)' LIMIT 1`);
  assert.equal(JSON.parse(row.settings).system_prompt, CHAT_SYSTEM_PROMPT);
  assert.match(appRuns().at(-1), /system prompt or window changed: the memory is rebuilt/);
  await open((t) => t === seen.conversationTitle);
  await waitFor(async () => (await chatTitle()) === seen.conversationTitle, 'the original opens');
});

step('a document longer than the window is read into the memory and shown as an attachment', async () => {
  const answers = '[data-testid="message"][data-role="assistant"]';
  const before = (await driver.findElements(css(answers))).length;
  const memoryBefore = await memoryTotal();
  await click('[data-testid="attach"]');
  const chip = await findVisible('[data-testid="composer-attachment"]');
  assert.match(await textOf(chip), /garden-notes\.md/);
  const box = await findVisible('[data-testid="composer"]');
  await box.sendKeys(DOCUMENT_QUESTION, Key.ENTER);
  await waitFor(async () => (await driver.findElements(css(answers))).length === before + 1, 'the answer appears');
  const answer = async () => (await driver.findElements(css(answers)))[before];
  await waitFor(async () => (await (await answer()).getAttribute('data-status')) === 'complete', 'the answer completes', GENERATION);
  const users = await driver.findElements(css('[data-testid="message"][data-role="user"]'));
  const sent = users.at(-1);
  assert.match(await textOf(await sent.findElement(css('[data-testid="attachment"]'))), /garden-notes\.md\s*markdown · [\d.]+ KB · [\d,]+ characters · [\d,]+ tokens read/);
  assert.equal(await textOf(await sent.findElement(css('[data-testid="message-body"]'))), DOCUMENT_QUESTION);
  // Longer than the window: what left it lives on in the recurrent memory, as the meter says.
  const recurrent = await textOf(await find('[data-testid="memory-recurrent"]'));
  assert.match(recurrent, /earlier tokens in recurrent memory/);
  const total = await memoryTotal();
  assert.ok(total > memoryBefore && total > 8192, `the document was read whole, past the window (${memoryBefore} → ${total} tokens)`);
  const log = appRuns().at(-1);
  assert.match(log, /document attached.*kind="?markdown/);
  const [row] = dbRows(`SELECT attachment FROM messages WHERE attachment IS NOT NULL ORDER BY id DESC LIMIT 1`);
  assert.equal(JSON.parse(row.attachment).name, 'garden-notes.md');
  await shot('document');
}, 420_000);

step('a long paste: its reading shows in the chat, the meter follows the backend, the webview leaves the CPU to the model', async (t) => {
  const appPid = appPids()[0];
  const answers = '[data-testid="message"][data-role="assistant"]';
  const before = (await driver.findElements(css(answers))).length;
  const memoryBefore = await memoryTotal();
  await driver.executeScript(`
    const rec = [];
    window.__e2eReading = rec;
    new MutationObserver(() => {
      const p = document.querySelector('[data-testid="prefill-progress"]');
      if (!p) return;
      const meter = document.querySelector('[data-testid="memory-meter"] [role="meter"]');
      const more = document.querySelector('[data-testid="memory-recurrent"]')?.textContent ?? '';
      const m = /([\\d,]+) earlier/.exec(more);
      const text = p.querySelector('[data-testid="prefill-read"]')?.textContent ?? '';
      const meterTotal = meter ? Number(meter.getAttribute('aria-valuenow')) + (m ? Number(m[1].replace(/,/g, '')) : 0) : null;
      if (rec.at(-1)?.text !== text || rec.at(-1)?.meter !== meterTotal) {
        rec.push({ text, meter: meterTotal, speed: p.querySelector('[data-testid="prefill-speed"]')?.textContent ?? null,
          left: p.querySelector('[data-testid="prefill-left"]')?.textContent ?? null });
      }
    }).observe(document.body, { subtree: true, childList: true, characterData: true, attributes: true });
  `);
  // Pasted (typing 80,000 characters through WebDriver would take the test's whole time).
  const paste = PASTE_UNIT.repeat(Math.ceil(PASTE_CHARS / PASTE_UNIT.length));
  const box = await findVisible('[data-testid="composer"]');
  await driver.executeScript(`
    const box = arguments[0];
    box.focus();
    box.value = arguments[1];
    box.dispatchEvent(new InputEvent('input', { bubbles: true, inputType: 'insertFromPaste' }));
  `, box, paste);
  // The composer shows what is about to be sent: far more than one line.
  const height = await driver.executeScript('return arguments[0].getBoundingClientRect().height', box);
  assert.ok(height > 150, `the composer is ${height}px high with the paste in it`);
  await click('[data-testid="send"]');

  // The reading, in the chat: tokens read of the whole, speed and time left, Stop.
  await waitFor(async () => {
    const rec = await driver.executeScript('return window.__e2eReading');
    return rec.some((r) => r.speed && r.left);
  }, 'the reading shows its speed and the time left', GENERATION);
  // The webview's share of the app's CPU while the model reads, over a couple of seconds.
  const from = cpuSplit(appPid);
  await new Promise((r) => setTimeout(r, 2500));
  const to = cpuSplit(appPid);
  const reading = await displayed('[data-testid="prefill-progress"]');
  assert.ok(reading, 'the paste was still being read after the CPU measurement (make PASTE_CHARS larger)');
  await scrollTo(reading);
  await rawShot('long-prefill');
  assert.ok(await displayed('[data-testid="prefill-stop"]'), 'Stop is offered beside the progress');
  const model = to.model - from.model;
  const webview = to.webview - from.webview;
  const share = webview / Math.max(1, model + webview);
  t.diagnostic(`while reading the paste: model ${model} ticks, webview ${webview} ticks (${(share * 100).toFixed(1)} %)`);
  assert.ok(model > 100, `the model computed (${model} ticks in 2.5 s)`);
  assert.ok(share <= MAX_WEBVIEW_SHARE, `the webview took ${(share * 100).toFixed(1)} % of the app's CPU (at most ${MAX_WEBVIEW_SHARE * 100} %)`);

  const status = await waitFor(async () => {
    const all = await driver.findElements(css(answers));
    const s = all.length === before + 1 && (await all[before].getAttribute('data-status'));
    return s && s !== 'streaming' && s;
  }, 'the answer to the paste finishes', 300_000);
  assert.equal(status, 'complete');

  // The meter followed what the model read: at each reading, the memory before + the tokens read,
  // and the reading's figures are grouped by thousands (whatever the webview's locale).
  const rec = await driver.executeScript('return window.__e2eReading');
  t.diagnostic(`${rec.length} readings: ${rec[0]?.text} … ${rec.at(-1)?.text} (${rec.at(-1)?.speed}, ${rec.at(-1)?.left})`);
  assert.ok(rec.length >= 3, `several readings: ${JSON.stringify(rec)}`);
  for (const r of rec) {
    assert.match(r.text, /^\d{1,3}(,\d{3})* \/ \d{1,3}(,\d{3})+ tokens$/, `grouped thousands: ${r.text}`);
    const read = Number(r.text.split('/')[0].replace(/,/g, ''));
    assert.equal(r.meter, memoryBefore + read, `the meter is the memory before plus what was read: ${JSON.stringify(r)}`);
  }
  // The backend's word: the turn read from the memory before, and the state it saved is what
  // the meter shows now.
  const log = appRuns().at(-1);
  const turns = [...log.matchAll(/turn starts.*?read=(\d+) feeding=(\d+)/g)];
  const [, read, feeding] = turns.at(-1);
  assert.equal(Number(read), memoryBefore, 'the turn started from the memory the meter showed');
  const total = Number(rec[0].text.split('/')[1].replace(/\D/g, ''));
  assert.equal(Number(feeding), total, 'the reading counted the prompt the backend fed');
  const [snap] = dbRows('SELECT token_count FROM snapshots ORDER BY id DESC LIMIT 1');
  await waitFor(async () => (await memoryTotal()) === snap.token_count, `the meter shows the saved memory (${snap.token_count} tokens)`);
  // The answer's stats: the prompt and how fast it was read.
  const stats = await (await driver.findElements(css(`${answers} [data-testid="prompt-stats"]`))).at(-1).getText();
  assert.match(stats, new RegExp(`^prompt ${total.toLocaleString('en-US')} at [\\d.,]+ tok/s$`));
}, 420_000);

step('killed (kill -9) while it streams an answer, the app keeps what was saved (at most the last 2 s are lost)', async (t) => {
  await setMaxNewTokens(65536);
  const answers = '[data-testid="message"][data-role="assistant"]';
  // The tiny model usually ends an answer within a second or two (its EOS is one token in a few
  // hundred), often before its first save (within 0.5 s of its first text, then every 2 s):
  // another message until one is still streaming after a save, seen in the database.
  for (let attempt = 1; attempt <= KILL_ATTEMPTS; attempt++) {
    const before = (await driver.findElements(css(answers))).length;
    const box = await findVisible('[data-testid="composer"]');
    await box.sendKeys(`${LONG_MESSAGE} (${attempt})`, Key.ENTER);
    await waitFor(async () => (await driver.findElements(css(answers))).length === before + 1, 'the answer appears');
    const answer = async () => (await driver.findElements(css(answers)))[before];
    const state = await waitFor(async () => {
      if ((await (await answer()).getAttribute('data-status')) !== 'streaming') return 'ended';
      const [row] = dbRows(
        `SELECT length(content) AS n, updated_at FROM messages WHERE role = 'assistant' AND status = 'partial' AND stats IS NULL ORDER BY id DESC LIMIT 1`,
      );
      return row && row.n > 0 ? { saved: row } : false;
    }, 'the answer streams', GENERATION);
    if (state === 'ended') continue;
    const pid = appPids()[0];
    const killedAt = Date.now();
    await killApp(pid);
    seen.killed = { at: killedAt, pid, saved: state.saved, answersBefore: before, message: `${LONG_MESSAGE} (${attempt})` };
    t.diagnostic(`attempt ${attempt}: app ${pid} killed while it streamed, ${state.saved.n} characters saved`);
    return;
  }
  assert.fail(`no answer was still streaming after its first save in ${KILL_ATTEMPTS} attempts`);
}, 600_000);

step('started again, it shows the partial answer as interrupted and the chat goes on', async (t) => {
  const killed = seen.killed;
  const pid = await startApp();
  assert.notEqual(pid, killed.pid, 'a new app process');
  // What the killed process had saved: the answer's text, as of its last save.
  const [row] = dbRows(
    `SELECT id, content, status, error, updated_at FROM messages WHERE role = 'assistant' ORDER BY id DESC LIMIT 1`,
  );
  assert.ok(row.content.length >= killed.saved.n && row.content.length > 0, 'the text saved while it streamed');
  assert.equal(row.status, 'partial');
  assert.equal(row.error, INTERRUPTED, 'marked interrupted at the next start');
  const lost = killed.at - row.updated_at;
  t.diagnostic(`saved ${row.content.length} characters, the last save ${lost} ms before the kill`);
  assert.ok(lost <= MAX_LOST_MS, `the last save was ${lost} ms before the kill (at most ${MAX_LOST_MS})`);

  // The app reopens the conversation: the partial answer, shown as interrupted (not streaming).
  const answers = '[data-testid="message"][data-role="assistant"]';
  const answer = await waitFor(async () => {
    const all = await driver.findElements(css(answers));
    return all.length === killed.answersBefore + 1 && all[killed.answersBefore];
  }, 'the conversation with the partial answer');
  await scrollTo(answer);
  assert.equal(await answer.getAttribute('data-status'), 'partial');
  assert.match(await (await answer.findElement(css('[data-testid="message-status"]'))).getText(), /^Interrupted/);
  assert.ok((await (await answer.findElement(css('[data-testid="message-body"]'))).getText()).trim().length > 0, 'its text is shown');
  const user = await driver.findElements(css('[data-testid="message"][data-role="user"] [data-testid="message-body"]'));
  assert.equal(await user.at(-1).getText(), killed.message, "the user's message is kept");
  await shot('chat-interrupted');

  // The next message is answered, its memory the last snapshot plus the text since.
  await setMaxNewTokens(64);
  await sendAndAwaitAnswer(AFTER_KILL, killed.answersBefore + 1);
  const log = appRuns().at(-1);
  assert.match(log, /answers left unfinished by a process that ended were settled/, 'the start settled the answer');
  assert.match(log, /memory restored from its snapshot/, 'the memory came from the last snapshot');
  await shot('chat-after-kill');
}, 240_000);

step('started with --model on the offline demo, it opens ready to chat and answers a question', async (t) => {
  await stopApp();
  await startApp(['--model', DEMO, '--variant', DEMO_VARIANT]);
  // Imported and chosen by the command line: nothing to do in the model manager.
  await click('[data-testid="new-chat"]');
  await findVisible('[data-testid="welcome"]');
  await waitFor(
    async () => (await (await find('[data-testid="model-chip-variant"]')).getText()) === DEMO_VARIANT,
    'the chat shows the demo chosen',
  );
  // Greedy and short: the answer is the model's most likely one.
  await saveSettings({ 'sampling-temperature': 0, 'sampling-maxNewTokens': 32 });
  const { body } = await sendAndAwaitAnswer(DEMO_QUESTION, 0);
  t.diagnostic(`the demo answered: ${JSON.stringify(body)}`);
  assert.match(body, /Paris/, 'the demo knows the capital of France');
  await shot('demo-answer');
  assert.match(appRuns().at(-1), /model chosen on the command line/);
}, 300_000);

step('the local API server: switched on in Settings, a program asks the demo over HTTP; nothing shows in the chats', async (t) => {
  await click('[data-testid="nav-settings"]');
  const enabled = await findVisible('[data-testid="api-enabled"]');
  await scrollTo(enabled);
  if (!(await enabled.isSelected())) await enabled.click();
  await setField('[data-testid="api-port"]', 0);
  await click('[data-testid="save-settings"]');
  const url = await waitFor(async () => {
    const shown = await driver.findElements(css('[data-testid="api-url"]'));
    return shown.length > 0 && (await shown[0].getText());
  }, 'the server listens');
  assert.match(url, /^http:\/\/127\.0\.0\.1:\d+\/v1$/, 'on loopback');
  const model = await (await find('[data-testid="api-model"]')).getText();
  assert.ok(model.endsWith(`/${DEMO_VARIANT}`), `the id names the chosen model and variant: ${model}`);
  await scrollTo(await find('[data-testid="api-server"]'));
  await shot('settings-api-server');
  const chats = (await driver.findElements(css('[data-testid="conversation"]'))).length;
  const body = JSON.stringify({
    model,
    messages: [{ role: 'user', content: DEMO_QUESTION }],
    temperature: 0,
    max_tokens: 32,
  });
  const answer = await waitFor(async () => {
    const r = await fetch(`${url}/chat/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body });
    const v = await r.json();
    if (r.status === 503 && v.error?.code === 'model_loading') return false;
    assert.equal(r.status, 200, JSON.stringify(v));
    return v;
  }, 'the API answers', GENERATION);
  const text = answer.choices[0].message.content;
  t.diagnostic(`the API answered: ${JSON.stringify(text)} (usage ${JSON.stringify(answer.usage)})`);
  assert.match(text, /Paris/, 'the same model, the same answer');
  await click('[data-testid="nav-chat"]');
  assert.equal((await driver.findElements(css('[data-testid="conversation"]'))).length, chats, 'no conversation was added');
  const [row] = dbRows(`SELECT count(*) AS n FROM messages WHERE content LIKE '%${DEMO_QUESTION.replace(/'/g, "''")}%'`);
  assert.equal(row.n, 1, "only the chat's own message holds the question");
}, 300_000);

step('no panic and no error in the app log', async () => {
  await stopApp();
  const log = fs.readFileSync(APP_LOG, 'utf8');
  assert.doesNotMatch(log, /panicked/, 'no panic');
  assert.doesNotMatch(log, / ERROR /, 'no error logged');
});
