// Chat: send and stream, stop (partial kept), regenerate (the old answer kept when the new one
// fails before its first token), edit-and-resend, copy, generation errors, an answer interrupted
// by the app closing, and a send that fails keeping the draft.
import assert from 'node:assert/strict';
import { after, afterEach, before, describe, test } from 'node:test';
import { mock, until, useSuite } from './helpers.mjs';

const suite = useSuite({ before, after, afterEach });

const lastAssistant = (page) => page.locator('[data-testid=message][data-role=assistant]').last();

function clean(page) {
  const p = suite.problems(page);
  assert.deepEqual(p.errors, [], 'no page errors');
  assert.deepEqual(p.dialogs, [], 'no dialogs');
}

describe('chat', () => {
  test('a message is sent and the answer streams token by token', async () => {
    const { page } = await suite.open({ timing: { firstTokenMs: 80, tokenMs: 30 } });
    await page.getByTestId('welcome').waitFor();
    const composer = page.getByTestId('composer');
    await composer.fill('Hello there, TPTT');
    await composer.press('Enter');

    const user = page.locator('[data-testid=message][data-role=user]');
    await user.first().waitFor();
    assert.equal(await user.first().getByTestId('message-body').textContent(), 'Hello there, TPTT');
    assert.equal(await composer.inputValue(), '', 'the draft is cleared once the backend has it');

    const answer = lastAssistant(page);
    await until(page, () => document.querySelector('[data-status=streaming] .markdown')?.textContent.length > 0);
    const lengths = [];
    for (let i = 0; i < 4; i++) {
      lengths.push(await page.evaluate(() => document.querySelector('[data-status=streaming] .markdown')?.textContent.length ?? -1));
      await page.waitForTimeout(150);
    }
    assert.ok(lengths.every((n) => n > 0), `streamed text seen: ${lengths}`);
    assert.ok(lengths[3] > lengths[0], `text grows while streaming: ${lengths}`);
    assert.equal(await page.getByTestId('stop').count(), 1, 'Stop is offered while streaming');
    assert.ok((await page.getByTestId('tps').count()) + (await page.getByTestId('ttft').count()) > 0, 'live speed shown');

    await answer.and(page.locator('[data-status=complete]')).waitFor();
    const text = await answer.locator('.markdown').textContent();
    assert.match(text, /linear-attention memory/);
    assert.equal(await answer.locator('pre.code-block code.language-rust').count(), 1, 'code is highlighted');
    assert.match(await answer.getByTestId('tps').textContent(), /tok\/s/);
    assert.match(await answer.getByTestId('ttft').textContent(), /TTFT \d+/);
    await page.getByTestId('memory-meter').waitFor();
    assert.equal(await page.getByTestId('chat-title').textContent(), 'Hello there, TPTT');
    await page.locator('[data-testid=conversation-title]', { hasText: 'Hello there, TPTT' }).waitFor();

    const stored = await mock(page, () => window.__tpttMock.state.conversations.find((c) => c.title === 'Hello there, TPTT'));
    assert.equal(stored.messages.length, 2);
    assert.equal(stored.messages[1].status, 'complete');
    assert.match(stored.messages[1].content, /\*\*linear-attention memory\*\*/);
    clean(page);
  });

  test('Stop keeps the partial answer, and Regenerate replaces it', async () => {
    const { page } = await suite.open({ timing: { firstTokenMs: 50, tokenMs: 60 } });
    const words = Array.from({ length: 100 }, (_, i) => `word${i}`).join(' ');
    await mock(page, (text) => window.__tpttMock.setReply(text), words);
    await page.getByTestId('composer').fill('Tell me a long story');
    await page.getByTestId('send').click();
    await until(page, () => document.querySelector('[data-status=streaming] .markdown')?.textContent.length > 20);
    await page.getByTestId('stop').click();

    const answer = lastAssistant(page);
    await answer.and(page.locator('[data-status=partial]')).waitFor();
    const partial = (await answer.locator('.markdown').textContent()).trim();
    assert.ok(partial.length > 0, 'partial text kept');
    assert.ok(!partial.includes('word99'), 'stopped before the end');
    assert.ok(words.startsWith(partial), 'the partial answer is a prefix of the reply');
    assert.match(await answer.getByTestId('message-status').textContent(), /Stopped/);
    const stored = await mock(page, () => {
      const c = window.__tpttMock.state.conversations.find((x) => x.title === 'Tell me a long story');
      return c.messages.at(-1);
    });
    assert.equal(stored.status, 'partial');
    assert.equal(stored.content.trim(), partial, 'what the UI shows is what the backend kept');
    await page.waitForTimeout(300);
    assert.equal((await answer.locator('.markdown').textContent()).trim(), partial, 'nothing arrives after stop');

    await mock(page, () => window.__tpttMock.setTiming({ tokenMs: 5 }));
    await answer.hover();
    await answer.getByRole('button', { name: 'Regenerate' }).click();
    await lastAssistant(page).and(page.locator('[data-status=complete]')).waitFor();
    assert.equal(await page.locator('[data-testid=message][data-role=assistant]').count(), 1, 'the answer was replaced');
    clean(page);
  });

  test('edit-and-resend drops later messages; copy puts the text on the clipboard', async () => {
    const { page, context } = await suite.open();
    await context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: suite.baseUrl });
    await page.locator('[data-testid=conversation-title]', { hasText: 'Rust borrow checker tips' }).click();
    const first = page.locator('[data-testid=message][data-role=user]').first();
    await first.waitFor();
    assert.equal(await page.locator('[data-testid=message]').count(), 2);

    await first.hover();
    await first.getByRole('button', { name: 'Copy message' }).click();
    await until(page, () => [...document.querySelectorAll('[data-testid=notice]')].some((n) => n.textContent.includes('Copied')));
    assert.equal(await page.evaluate(() => navigator.clipboard.readText()), 'Why does the borrow checker reject two mutable borrows?');

    await first.getByRole('button', { name: 'Edit and resend' }).click();
    const box = page.getByLabel('Edit your message');
    await box.fill('What does &mut promise?');
    await page.getByRole('button', { name: 'Save & resend' }).click();
    await lastAssistant(page).and(page.locator('[data-status=complete]')).waitFor();
    const users = await page.locator('[data-testid=message][data-role=user] [data-testid=message-body]').allTextContents();
    assert.deepEqual(users, ['What does &mut promise?']);
    assert.equal(await page.locator('[data-testid=message]').count(), 2);
    const stored = await mock(page, () => window.__tpttMock.state.conversations.find((c) => c.id === 'c-rust').messages.map((m) => m.content));
    assert.equal(stored[0], 'What does &mut promise?');
    assert.equal(stored.length, 2);
    clean(page);
  });

  test('a generation error keeps the partial answer and offers a retry', async () => {
    const { page } = await suite.open();
    await mock(page, () => window.__tpttMock.failGeneration(5, 'model_load', 'The variant file is truncated.'));
    await page.getByTestId('composer').fill('Will this fail?');
    await page.getByTestId('composer').press('Enter');
    const answer = lastAssistant(page);
    await answer.and(page.locator('[data-status=error]')).waitFor();
    assert.ok((await answer.locator('.markdown').textContent()).trim().length > 0, 'partial text kept');
    assert.match(await answer.getByTestId('message-status').textContent(), /Generation failed: The variant file is truncated/);
    const notice = page.getByTestId('notice').filter({ hasText: 'could not be loaded' });
    await notice.waitFor();
    await notice.getByRole('button', { name: 'Open model manager' }).waitFor();
    await notice.getByRole('button', { name: 'Retry' }).click();
    await lastAssistant(page).and(page.locator('[data-status=complete]')).waitFor();
    // console errors are not expected: the error is handled, not thrown
    clean(page);
  });

  test('a regenerate that fails before its first token keeps the old answer', async () => {
    const { page } = await suite.open();
    await page.locator('[data-testid=conversation-title]', { hasText: 'Rust borrow checker tips' }).click();
    const answer = lastAssistant(page);
    await answer.waitFor();
    const old = await answer.locator('.markdown').textContent();
    await mock(page, () => window.__tpttMock.failGeneration(0, 'model_load', 'The variant file is truncated.'));
    await answer.hover();
    await answer.getByRole('button', { name: 'Regenerate' }).click();
    await page.getByTestId('notice').filter({ hasText: 'could not be loaded' }).waitFor();
    await until(page, () => !document.querySelector('[data-testid=message][data-status=streaming]'));
    const answers = page.locator('[data-testid=message][data-role=assistant]');
    assert.equal(await answers.count(), 1, 'no failed answer beside it');
    assert.equal(await answers.first().getAttribute('data-status'), 'complete');
    assert.equal(await answers.first().locator('.markdown').textContent(), old, 'the old answer is back');
    const stored = await mock(page, () => window.__tpttMock.state.conversations.find((c) => c.id === 'c-rust').messages);
    assert.equal(stored.length, 2, 'the backend kept it too');
    assert.equal(stored[1].status, 'complete');
    clean(page);
  });

  test('an answer cut short by the app closing is shown as interrupted, with its text', async () => {
    const { page } = await suite.open();
    await mock(page, () => {
      const c = window.__tpttMock.state.conversations.find((x) => x.id === 'c-rust');
      Object.assign(c.messages[1], {
        content: 'The borrow checker',
        status: 'partial',
        stats: null,
        error: 'the app closed before this answer was finished; the text saved until then is kept',
      });
    });
    await page.locator('[data-testid=conversation-title]', { hasText: 'Rust borrow checker tips' }).click();
    const answer = lastAssistant(page);
    await answer.waitFor();
    assert.equal(await answer.getAttribute('data-status'), 'partial');
    assert.equal((await answer.locator('.markdown').textContent()).trim(), 'The borrow checker');
    assert.match(
      await answer.getByTestId('message-status').textContent(),
      /Interrupted — the app closed before this answer was finished/,
    );
    await answer.hover();
    await answer.getByRole('button', { name: 'Regenerate' }).waitFor();
    clean(page);
  });

  test('a send the backend refuses keeps the draft and the messages as they were', async () => {
    const { page } = await suite.open();
    await page.locator('[data-testid=conversation-title]', { hasText: 'Trip to Lisbon' }).click();
    await page.locator('[data-testid=message]').first().waitFor();
    await mock(page, () => window.__tpttMock.failNext('send_message', 'database', 'database is locked'));
    const composer = page.getByTestId('composer');
    await composer.fill('And where to eat?');
    await composer.press('Enter');
    const notice = page.getByTestId('notice').filter({ hasText: 'database is locked' });
    await notice.waitFor();
    assert.equal(await composer.inputValue(), 'And where to eat?');
    assert.equal(await page.locator('[data-testid=message]').count(), 2, 'no phantom messages');
    await notice.getByRole('button', { name: 'Retry' }).waitFor();
    await composer.press('Enter');
    await lastAssistant(page).and(page.locator('[data-status=complete]')).waitFor();
    assert.equal(await composer.inputValue(), '');
    assert.equal(await page.locator('[data-testid=message]').count(), 4);
    clean(page);
  });
});
