// Shared test plumbing: a tiny static server for the mock build (dist-mock/), headless Debian
// Chromium driven by playwright-core, and a page that fails the test on any uncaught error,
// console error or JavaScript dialog.
//
// Pages are served with a strict Content-Security-Policy (no inline script, no inline style
// attribute, no eval), the policy the Tauri app is meant to run under; `csp: false` serves
// without it (the XSS test, so that CSP cannot hide a sanitizer failure).

import { createServer } from 'node:http';
import { readFile, stat } from 'node:fs/promises';
import { extname, join, normalize } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const ROOT = fileURLToPath(new URL('../dist-mock/', import.meta.url));
export const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
export const CSP =
  "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; " +
  "connect-src 'self' ipc: http://ipc.localhost; object-src 'none'; base-uri 'none'; form-action 'none'";

const TYPES = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.map': 'application/json',
  '.svg': 'image/svg+xml',
  '.png': 'image/png',
};

/** Serves dist-mock/ on 127.0.0.1 (a free port). `?csp=0` turns the CSP header off. */
export async function startServer() {
  await stat(join(ROOT, 'index.html')).catch(() => {
    throw new Error('dist-mock/ is missing: run `npm run build:mock` first (npm test does).');
  });
  const server = createServer(async (req, res) => {
    const url = new URL(req.url ?? '/', 'http://127.0.0.1');
    let path = normalize(decodeURIComponent(url.pathname)).replace(/^([/\\])+/, '');
    if (path.includes('..')) {
      res.writeHead(400).end();
      return;
    }
    if (!path || path.endsWith('/')) path += 'index.html';
    try {
      const body = await readFile(join(ROOT, path));
      const headers = { 'content-type': TYPES[extname(path)] ?? 'application/octet-stream', 'cache-control': 'no-store' };
      if (extname(path) === '.html' && url.searchParams.get('csp') !== '0') headers['content-security-policy'] = CSP;
      res.writeHead(200, headers).end(body);
    } catch {
      res.writeHead(404).end('not found');
    }
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address();
  return { url: `http://127.0.0.1:${port}/`, close: () => new Promise((r) => server.close(r)) };
}

export async function launchBrowser() {
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--no-first-run',
    ],
  });
}

/**
 * One browser and server per test file. `suite.open({ scenario, csp, timing })` gives a fresh
 * context and page with the app loaded and the mock ready; `suite.problems(page)` lists the
 * errors and dialogs it saw.
 */
export function useSuite({ before, after, afterEach }) {
  const state = { browser: null, server: null, contexts: [] };
  const problems = new WeakMap();

  before(async () => {
    state.server = await startServer();
    state.browser = await launchBrowser();
  });
  afterEach(async () => {
    for (const c of state.contexts.splice(0)) await c.close().catch(() => {});
  });
  after(async () => {
    await state.browser?.close();
    await state.server?.close();
  });

  return {
    get baseUrl() {
      return state.server.url;
    },
    async open({ scenario = 'ready', csp = true, timing = { firstTokenMs: 60, tokenMs: 12 }, viewport, init } = {}) {
      const context = await state.browser.newContext({
        viewport: viewport ?? { width: 1280, height: 860 },
        acceptDownloads: true,
      });
      state.contexts.push(context);
      const page = await context.newPage();
      // A script run before the app's (e.g. to stand in for a webview without a locale).
      if (init) await page.addInitScript(init);
      const seen = { errors: [], dialogs: [] };
      problems.set(page, seen);
      page.on('pageerror', (err) => seen.errors.push(`pageerror: ${err.message}`));
      page.on('console', (msg) => {
        if (msg.type() === 'error') seen.errors.push(`console: ${msg.text()}`);
      });
      page.on('dialog', async (dialog) => {
        seen.dialogs.push(`${dialog.type()}: ${dialog.message()}`);
        await dialog.dismiss().catch(() => {});
      });
      const query = new URLSearchParams({ scenario });
      if (!csp) query.set('csp', '0');
      await page.goto(`${state.server.url}?${query}`);
      await page.waitForFunction(() => !!window.__tpttMock);
      await page.evaluate((t) => window.__tpttMock.setTiming(t), timing);
      await page.locator('.sidebar').waitFor();
      return { page, context };
    },
    problems(page) {
      return problems.get(page) ?? { errors: [], dialogs: [] };
    },
  };
}

/** Calls into the mock backend's controls. */
export function mock(page, fn, arg) {
  return page.evaluate(fn, arg);
}

/** Waits until `fn` (run in the page) returns truthy; returns its value. */
export async function until(page, fn, arg, timeout = 10_000) {
  const handle = await page.waitForFunction(fn, arg, { timeout, polling: 20 });
  return handle.jsonValue();
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
