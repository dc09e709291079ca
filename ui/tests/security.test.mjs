// Model output is untrusted: script, event handlers, javascript: links and remote images in an
// answer (or in a title) are rendered inert. Served without CSP so that only the sanitizer stands
// between the payload and the page.
import assert from 'node:assert/strict';
import { after, afterEach, before, describe, test } from 'node:test';
import { mock, useSuite } from './helpers.mjs';

const suite = useSuite({ before, after, afterEach });

const PAYLOAD = [
  'Some **bold** text, then trouble:',
  '',
  '<img src=x onerror=alert(1)>',
  '',
  '<script>alert(2)</script>',
  '',
  '[click me](javascript:alert(3)) and [also](JaVaScRiPt:alert(33))',
  '',
  '<a href="javascript:alert(4)">raw link</a>',
  '',
  '![pixel](https://tracker.example/pixel.png "x\\" onerror=\\"alert(5)")',
  '',
  '<iframe src="javascript:alert(6)"></iframe><svg onload=alert(7)></svg>',
  '',
  '<details open ontoggle=alert(8)><summary>x</summary></details>',
  '',
  '[data](data:text/html;base64,PHNjcmlwdD5hbGVydCg5KTwvc2NyaXB0Pg==)',
  '',
  '```html',
  '<script>alert(10)</script>',
  '```',
  '',
  'A real link: [paper](https://arxiv.org/abs/2506.17671)',
].join('\n');

/** Everything dangerous the answer's DOM could hold. */
function inspect() {
  const root = document.querySelector('[data-testid=message][data-role=assistant]:last-of-type .markdown');
  const all = [...document.querySelectorAll('*')];
  return {
    found: !!root,
    text: root?.textContent ?? '',
    dangerousTags: [...document.querySelectorAll('.message-list img, .message-list script, .message-list iframe, .message-list svg:not(.icon), .message-list object, .message-list embed, .message-list details')].map((e) => e.outerHTML),
    handlers: all.flatMap((e) => [...e.attributes].filter((a) => a.name.toLowerCase().startsWith('on')).map((a) => `${e.tagName}[${a.name}]`)),
    badLinks: [...document.querySelectorAll('[href],[src],[action],[formaction]')]
      .flatMap((e) => ['href', 'src', 'action', 'formaction'].map((n) => e.getAttribute(n)).filter(Boolean))
      .filter((v) => /^\s*(javascript|data|vbscript):/i.test(v)),
    links: [...(root?.querySelectorAll('a') ?? [])].map((a) => a.getAttribute('href')),
    scripts: document.scripts.length,
    fired: window.__xss ?? [],
  };
}

describe('security', () => {
  test('an XSS payload in a model answer is rendered inert', async () => {
    const { page } = await suite.open({ csp: false });
    // Anything that manages to run would call alert (a dialog) or leave a mark here.
    await page.evaluate(() => {
      window.__xss = [];
      const mark = (name) => (...args) => window.__xss.push(`${name}:${args.join(',')}`);
      window.alert = mark('alert');
      window.confirm = mark('confirm');
      window.prompt = mark('prompt');
    });
    const scriptsBefore = await page.evaluate(() => document.scripts.length);
    await mock(page, (text) => window.__tpttMock.setReply(text), PAYLOAD);
    await page.getByTestId('composer').fill('<img src=x onerror=alert(11)> please answer');
    await page.getByTestId('composer').press('Enter');
    await page.locator('[data-testid=message][data-role=assistant][data-status=complete]').waitFor();
    await page.waitForTimeout(300);

    const result = await page.evaluate(inspect);
    assert.ok(result.found);
    assert.deepEqual(result.fired, [], 'no payload ran');
    assert.deepEqual(suite.problems(page).dialogs, [], 'no dialog fired');
    assert.deepEqual(result.dangerousTags, [], 'no img/script/iframe/svg/details in the messages');
    assert.deepEqual(result.handlers, [], 'no on* attribute anywhere');
    assert.deepEqual(result.badLinks, [], 'no javascript:/data: URL anywhere');
    assert.deepEqual(result.links, ['https://arxiv.org/abs/2506.17671'], 'only the http link stays a link');
    assert.equal(result.scripts, scriptsBefore, 'no script element added');
    // The model's raw HTML is shown as the text it is.
    assert.ok(result.text.includes('<img src=x onerror=alert(1)>'), 'raw HTML is displayed as text');
    assert.ok(result.text.includes('<script>alert(10)</script>'), 'code shows its text');
    // The user's own message is plain text too, and so is the title made from it.
    const userText = await page.locator('[data-testid=message][data-role=user] [data-testid=message-body]').textContent();
    assert.equal(userText, '<img src=x onerror=alert(11)> please answer');
    assert.equal(await page.getByTestId('chat-title').textContent(), '<img src=x onerror=alert(11)> please answer');

    // Links open outside the app (open_url), never in its webview.
    const url = page.url();
    await page.locator('.markdown a', { hasText: 'paper' }).click();
    await page.waitForFunction(() => window.__tpttMock.openedUrls.length === 1);
    assert.deepEqual(await mock(page, () => window.__tpttMock.openedUrls), ['https://arxiv.org/abs/2506.17671']);
    assert.equal(page.url(), url);
    // The neutralised javascript: link is text, and clicking it does nothing.
    await page.locator('.markdown', { hasText: 'click me' }).getByText('click me').click();
    await page.waitForTimeout(200);
    assert.deepEqual(await page.evaluate(() => window.__xss), []);
    assert.equal(page.url(), url);
    assert.deepEqual(suite.problems(page).errors, []);
  });

  test('sanitizing keeps ordinary markdown: tables, task lists, code, quotes', async () => {
    const { page } = await suite.open();
    const reply = [
      '| model | size |', '|:--|--:|', '| gemma | 270M |', '',
      '- [x] downloaded', '- [ ] tried', '',
      '> quoted', '',
      '```python', 'def f(x):', '    return x * 2', '```', '',
      'Inline `code`, ~~struck~~, <https://example.org>.',
    ].join('\n');
    await mock(page, (text) => window.__tpttMock.setReply(text), reply);
    await page.getByTestId('composer').fill('markdown please');
    await page.getByTestId('composer').press('Enter');
    const md = page.locator('[data-testid=message][data-role=assistant][data-status=complete] .markdown');
    await md.waitFor();
    assert.equal(await md.locator('table th').count(), 2);
    assert.equal(await md.locator('table td').count(), 2);
    assert.equal(await md.locator('td[align=right], th[align=right]').count(), 2);
    assert.equal(await md.locator('input[type=checkbox][disabled]').count(), 2);
    assert.equal(await md.locator('input[type=checkbox][checked]').count(), 1);
    assert.equal(await md.locator('blockquote').count(), 1);
    assert.equal(await md.locator('code.language-python .hljs-keyword').count(), 2);
    assert.equal(await md.locator('del').count(), 1);
    assert.deepEqual(await md.locator('a').evaluateAll((as) => as.map((a) => a.getAttribute('href'))), ['https://example.org']);
    // the code block's copy button copies the code
    await page.context().grantPermissions(['clipboard-read', 'clipboard-write'], { origin: suite.baseUrl });
    await md.getByRole('button', { name: 'Copy code' }).click();
    assert.equal(await page.evaluate(() => navigator.clipboard.readText()), 'def f(x):\n    return x * 2');
    assert.deepEqual(suite.problems(page).errors, []);
  });

  test('a hostile conversation title is shown as text', async () => {
    const { page } = await suite.open({ csp: false });
    await page.evaluate(() => {
      window.__xss = [];
      window.alert = (...a) => window.__xss.push(a.join());
    });
    const row = page.getByTestId('conversation').filter({ hasText: 'Trip to Lisbon' });
    await row.getByRole('button', { name: 'Actions for Trip to Lisbon' }).click();
    await row.getByRole('menuitem', { name: 'Rename' }).click();
    const hostile = '<img src=x onerror=alert(12)><script>alert(13)</script>';
    await page.getByTestId('rename-input').fill(hostile);
    await page.getByTestId('rename-input').press('Enter');
    await page.getByTestId('conversation-title').filter({ hasText: '<img src=x' }).waitFor();
    const r = await page.evaluate(inspect);
    assert.deepEqual(r.handlers, []);
    assert.deepEqual(await page.evaluate(() => window.__xss), []);
    assert.equal(await page.locator('.sidebar img, .sidebar script').count(), 0);
    assert.deepEqual(suite.problems(page).dialogs, []);
  });
});
