// Bad input: a 1 MB paste is taken without freezing, is never lost (a refused send keeps it,
// a reload brings it back), and sends once the backend accepts it.
import assert from 'node:assert/strict';
import { after, afterEach, before, describe, test } from 'node:test';
import { mock, useSuite } from './helpers.mjs';

const suite = useSuite({ before, after, afterEach });
const MB = 1024 * 1024;

/** The longest gap between animation frames over `ms`, in the page: a freeze shows up here. */
function longestFrameGap(page, ms) {
  return page.evaluate(
    (ms) =>
      new Promise((resolve) => {
        let last = performance.now();
        let worst = 0;
        const end = last + ms;
        const step = (t) => {
          worst = Math.max(worst, t - last);
          last = t;
          if (t < end) requestAnimationFrame(step);
          else resolve(worst);
        };
        requestAnimationFrame(step);
      }),
    ms,
  );
}

describe('input', () => {
  test('a 1 MB paste is handled without freezing and never lost', async () => {
    const { page, context } = await suite.open();
    await context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: suite.baseUrl });
    const big = await page.evaluate((n) => {
      const line = 'The quick brown fox jumps over the lazy dog; 0123456789. ';
      let s = '';
      while (s.length < n) s += line + '\n';
      return s.slice(0, n - 4) + ' END';
    }, MB);
    assert.equal(big.length, MB);

    await page.evaluate((text) => navigator.clipboard.writeText(text), big);
    const composer = page.getByTestId('composer');
    await composer.click();
    const t0 = Date.now();
    await page.keyboard.press('Control+v');
    await page.waitForFunction((n) => document.querySelector('[data-testid=composer]').value.length === n, MB, { timeout: 15_000 });
    const pasteMs = Date.now() - t0;
    const gap = await longestFrameGap(page, 600);
    assert.ok(pasteMs < 5000, `paste took ${pasteMs} ms`);
    assert.ok(gap < 500, `the page keeps drawing after the paste (longest frame gap ${Math.round(gap)} ms)`);
    await page.getByText('1,048,576 characters').waitFor();
    // typing at the end still works
    await page.keyboard.press('Control+End');
    await page.keyboard.type('!');
    assert.equal((await composer.inputValue()).length, MB + 1);

    // The backend refuses: the text stays in the composer, and a notice says why.
    await mock(page, () => window.__tpttMock.failNext('send_message', 'input_too_long', 'The message is 1,048,577 characters; the limit is 512 KiB.'));
    await page.keyboard.press('Enter');
    await page.getByTestId('notice').filter({ hasText: 'The message is too long' }).waitFor();
    assert.equal(await composer.inputValue(), big + '!');

    // Reloading the app (or a crash) does not lose it either.
    await page.waitForTimeout(600);
    await page.reload();
    await page.waitForFunction(() => !!window.__tpttMock);
    await page.waitForFunction((n) => document.querySelector('[data-testid=composer]')?.value.length === n, MB + 1);

    // The refused first message left no empty chat behind; the new chat holds the draft.
    assert.equal(await page.getByTestId('chat-title').textContent(), 'New chat');
    const t1 = Date.now();
    await page.getByTestId('send').click();
    const user = page.locator('[data-testid=message][data-role=user]');
    await user.waitFor();
    await page.locator('[data-testid=message][data-role=assistant][data-status=complete]').waitFor();
    assert.ok(Date.now() - t1 < 8000, 'sending 1 MB stays quick');
    assert.equal(await composer.inputValue(), '', 'the draft is cleared once accepted');
    await user.getByRole('button', { name: /Show all \(1,048,577 characters\)/ }).waitFor();
    const stored = await mock(page, () => window.__tpttMock.state.conversations.flatMap((c) => c.messages).filter((m) => m.role === 'user').map((m) => m.content.length));
    assert.ok(stored.includes(MB + 1), 'the backend got all of it');
    assert.ok((await longestFrameGap(page, 300)) < 500);
    assert.deepEqual(suite.problems(page).errors, []);
  });
});
