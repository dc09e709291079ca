// Memory health: the meter's health label, the warning when the memory breaks (shown while the
// answer streams), the way out ("Continue with a fresh memory" → reset_memory), the milder note
// for a strained memory, and a reset the backend refuses.
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

async function sendText(page, text) {
  const composer = page.getByTestId('composer');
  await composer.fill(text);
  await composer.press('Enter');
}

describe('memory health', () => {
  test('the meter shows the memory health with its perplexities', async () => {
    const { page } = await suite.open();
    await page.locator('[data-testid=conversation-title]', { hasText: 'Linear attention memory' }).click();
    const health = page.getByTestId('memory-health');
    await health.waitFor();
    assert.equal(await health.textContent(), 'Memory: healthy · perplexity 24 → 26');
    assert.equal(await health.getAttribute('data-verdict'), 'healthy');
    assert.match(await health.getAttribute('title'), /Perplexity is how surprised the model is/);
    assert.equal(await page.getByTestId('memory-warning').count(), 0);
    assert.equal(await page.getByTestId('memory-note').count(), 0);

    // A short new chat: too little read to judge.
    await page.getByTestId('new-chat').click();
    await sendText(page, 'Hi');
    await lastAssistant(page).and(page.locator('[data-status=complete]')).waitFor();
    await until(page, () => document.querySelector('[data-testid=memory-health]')?.dataset.verdict === 'unknown');
    assert.equal(await page.getByTestId('memory-health').textContent(), 'Memory: not measured yet');
    clean(page);
  });

  test('a broken memory is announced while the answer streams, and a fresh memory clears it', async () => {
    const { page } = await suite.open({ timing: { firstTokenMs: 60, tokenMs: 60 } });
    await mock(page, () => window.__tpttMock.setReply(Array.from({ length: 40 }, (_, i) => `garbage${i}`).join(' ')));
    await sendText(page, 'Please read this whole log [[memory:broken]] and summarise it');

    const warning = page.getByTestId('memory-warning');
    await warning.waitFor();
    assert.equal(await page.locator('[data-testid=message][data-status=streaming]').count(), 1, 'before the answer is done');
    const text = await warning.textContent();
    assert.match(text, /memory is making its answers unreliable/);
    assert.match(text, /7\.7× as surprising/);
    assert.match(text, /at most 512 tokens/, 'the mock window (512) bounds what a fresh memory reads');
    assert.equal(await warning.getAttribute('role'), 'alert');
    const health = page.getByTestId('memory-health');
    assert.equal(await health.getAttribute('data-verdict'), 'broken');
    assert.equal(await health.textContent(), 'Memory: broken · perplexity 26 → 204');
    const reset = page.getByTestId('memory-reset');
    assert.ok(await reset.isDisabled(), 'no reset while the answer is generated');

    await lastAssistant(page).and(page.locator('[data-status=complete]')).waitFor();
    assert.ok(await warning.isVisible(), 'the warning stays after the answer');
    await reset.click();
    await warning.waitFor({ state: 'detached' });
    const calls = await mock(page, () => window.__tpttMock.calls.filter((c) => c.command === 'reset_memory'));
    const id = await mock(page, () => window.__tpttMock.state.conversations.find((c) => c.title.startsWith('Please read')).id);
    assert.deepEqual(calls.map((c) => c.args), [{ conversationId: id }]);
    assert.equal(await health.getAttribute('data-verdict'), 'unknown');
    assert.match(await page.getByTestId('memory-recurrent').textContent(), /Everything fits/);
    await page.getByTestId('notice').filter({ hasText: 'The memory was reset' }).waitFor();

    // The next turn reads the conversation's tail into the fresh memory: no warning.
    await mock(page, () => window.__tpttMock.setTiming({ tokenMs: 5 }));
    await sendText(page, 'Thanks, go on');
    await lastAssistant(page).and(page.locator('[data-status=complete]')).waitFor();
    const sent = await mock(page, (cid) => window.__tpttMock.calls.filter((c) => c.command === 'send_message' && c.args.conversationId === cid).length, id);
    assert.equal(sent, 2);
    assert.notEqual(await health.getAttribute('data-verdict'), 'broken');
    assert.equal(await warning.count(), 0);
    clean(page);
  });

  test('a strained memory gets a milder note', async () => {
    const { page } = await suite.open();
    await sendText(page, 'Some notes [[memory:strained]]');
    await lastAssistant(page).and(page.locator('[data-status=complete]')).waitFor();
    const note = page.getByTestId('memory-note');
    await note.waitFor();
    assert.match(await note.textContent(), /3\.0× as surprising as the start/);
    assert.equal(await page.getByTestId('memory-warning').count(), 0);
    assert.equal(await page.getByTestId('memory-health').getAttribute('data-verdict'), 'strained');
    await note.getByTestId('memory-reset').click();
    await note.waitFor({ state: 'detached' });
    clean(page);
  });

  test('a refused reset keeps the warning and says why', async () => {
    const { page } = await suite.open();
    await sendText(page, 'x'.repeat(13_000));
    await lastAssistant(page).and(page.locator('[data-status=complete]')).waitFor();
    const warning = page.getByTestId('memory-warning');
    await warning.waitFor();
    await mock(page, () => window.__tpttMock.failNext('reset_memory', 'database', 'database is locked'));
    await page.getByTestId('memory-reset').click();
    await page.getByTestId('notice').filter({ hasText: 'database is locked' }).waitFor();
    assert.ok(await warning.isVisible());
    await page.getByTestId('memory-reset').click();
    await warning.waitFor({ state: 'detached' });
    clean(page);
  });
});
