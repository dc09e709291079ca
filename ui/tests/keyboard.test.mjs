// Keyboard: Enter sends, Shift+Enter adds a line, Esc stops, Ctrl/Cmd+N new chat, Ctrl/Cmd+K
// search; Esc in an edit box only cancels the edit; focus is visible and lands where expected.
import assert from 'node:assert/strict';
import { after, afterEach, before, describe, test } from 'node:test';
import { mock, until, useSuite } from './helpers.mjs';

const suite = useSuite({ before, after, afterEach });
const active = (page) => page.evaluate(() => document.activeElement?.getAttribute('data-testid') ?? document.activeElement?.tagName);

describe('keyboard', () => {
  test('Shift+Enter adds a line, Enter sends, Esc stops the answer', async () => {
    const { page } = await suite.open({ timing: { firstTokenMs: 40, tokenMs: 50 } });
    const composer = page.getByTestId('composer');
    await composer.click();
    await page.keyboard.type('first line');
    await page.keyboard.press('Shift+Enter');
    await page.keyboard.type('second line');
    assert.equal(await composer.inputValue(), 'first line\nsecond line');
    assert.equal(await page.locator('[data-testid=message]').count(), 0, 'Shift+Enter does not send');
    await page.keyboard.press('Enter');
    await page.locator('[data-testid=message][data-role=user]').waitFor();
    assert.equal(
      await page.locator('[data-testid=message][data-role=user] [data-testid=message-body]').textContent(),
      'first line\nsecond line',
    );
    await until(page, () => document.querySelector('[data-status=streaming] .markdown')?.textContent.length > 5);
    await page.keyboard.press('Escape');
    await page.locator('[data-testid=message][data-role=assistant][data-status=partial]').waitFor();
    assert.ok((await mock(page, () => window.__tpttMock.calls.map((c) => c.command))).includes('stop_generation'));
    assert.deepEqual(suite.problems(page).errors, []);
  });

  test('Ctrl+N starts a new chat with the composer focused; Ctrl+K focuses search', async () => {
    const { page } = await suite.open();
    await page.getByTestId('conversation-title').filter({ hasText: 'Trip to Lisbon' }).click();
    await page.getByTestId('chat-title').filter({ hasText: 'Trip to Lisbon' }).waitFor();
    await page.getByTestId('nav-settings').click();
    await page.keyboard.press('Control+k');
    assert.equal(await active(page), 'search');
    await page.keyboard.type('rust');
    await page.waitForFunction(() => document.querySelectorAll('[data-testid=conversation]').length === 1);

    await page.keyboard.press('Control+n');
    await page.getByTestId('welcome').waitFor();
    assert.equal(await page.getByTestId('chat-title').textContent(), 'New chat');
    await page.waitForFunction(() => document.activeElement?.getAttribute('data-testid') === 'composer');
    // Meta (Cmd on macOS) works the same
    await page.getByTestId('conversation-title').filter({ hasText: 'Rust' }).click();
    await page.getByTestId('chat-title').filter({ hasText: 'Rust' }).waitFor();
    await page.keyboard.press('Meta+n');
    await page.getByTestId('welcome').waitFor();
    await page.keyboard.press('Meta+k');
    assert.equal(await active(page), 'search');
    assert.deepEqual(suite.problems(page).errors, []);
  });

  test('Esc in an edit box cancels the edit; Enter there resends', async () => {
    const { page } = await suite.open();
    await page.getByTestId('conversation-title').filter({ hasText: 'Trip to Lisbon' }).click();
    const user = page.locator('[data-testid=message][data-role=user]').first();
    await user.waitFor();
    await user.hover();
    await user.getByRole('button', { name: 'Edit and resend' }).click();
    const box = page.getByLabel('Edit your message');
    assert.equal(await active(page), 'TEXTAREA');
    await box.fill('changed');
    await page.keyboard.press('Escape');
    await box.waitFor({ state: 'detached' });
    assert.equal(await user.getByTestId('message-body').textContent(), 'Three things to see in Lisbon?');

    await user.hover();
    await user.getByRole('button', { name: 'Edit and resend' }).click();
    await page.getByLabel('Edit your message').fill('Two things to see in Porto?');
    await page.keyboard.press('Enter');
    await page.locator('[data-testid=message][data-role=assistant][data-status=complete]').waitFor();
    assert.equal(
      await page.locator('[data-testid=message][data-role=user] [data-testid=message-body]').first().textContent(),
      'Two things to see in Porto?',
    );
    assert.deepEqual(suite.problems(page).errors, []);
  });

  test('every control reachable by Tab has a name', async () => {
    const { page } = await suite.open();
    const unnamed = [];
    for (const screen of ['chat', 'models', 'settings']) {
      await page.getByTestId(`nav-${screen}`).click();
      await page.waitForTimeout(100);
      const found = await page.evaluate(() =>
        [...document.querySelectorAll('button, input, select, textarea, a[href], [tabindex]:not([tabindex="-1"])')]
          .filter((el) => !el.closest('dialog:not([open])') && el.offsetParent !== null)
          .filter((el) => {
            const id = el.id && document.querySelector(`label[for="${el.id}"]`);
            const name =
              el.getAttribute('aria-label') ||
              el.getAttribute('aria-labelledby') ||
              el.closest('label')?.textContent?.trim() ||
              id?.textContent?.trim() ||
              (el.tagName === 'BUTTON' || el.tagName === 'A' ? el.textContent.trim() : '') ||
              el.getAttribute('title');
            return !name;
          })
          .map((el) => el.outerHTML.slice(0, 120)),
      );
      unnamed.push(...found);
    }
    assert.deepEqual(unnamed, []);
  });
});
