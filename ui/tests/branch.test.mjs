// "Branch from here": a new chat that starts as the open one up to a message; the original is
// unchanged; a refusal is shown.
import assert from 'node:assert/strict';
import { after, afterEach, before, describe, test } from 'node:test';
import { mock, useSuite } from './helpers.mjs';

const suite = useSuite({ before, after, afterEach });

describe('branch from here', () => {
  test('a branch from an answer opens with the messages up to it', async () => {
    const { page } = await suite.open();
    await page.locator('[data-testid=conversation-title]', { hasText: 'Linear attention memory' }).click();
    const messages = page.locator('[data-testid=message]');
    await messages.first().waitFor();
    const total = await messages.count();
    assert.ok(total >= 3, `${total} messages`);
    const firstAnswer = page.locator('[data-testid=message][data-role=assistant]').first();
    await firstAnswer.hover();
    await firstAnswer.getByTestId('branch').click();
    await page.getByTestId('notice').filter({ hasText: 'continues from the memory saved at that turn' }).waitFor();
    await page.getByTestId('chat-title').filter({ hasText: 'Linear attention memory (branch)' }).waitFor();
    const kept = await page.locator('[data-testid=message]').count();
    assert.ok(kept < total, `the branch has ${kept} of ${total} messages`);
    assert.equal(await page.locator('[data-testid=message]').last().getAttribute('data-role'), 'assistant');
    const call = await mock(page, () => window.__tpttMock.calls.filter((c) => c.command === 'branch_conversation').at(-1));
    assert.ok(call.args.id && call.args.messageId, JSON.stringify(call));
    // The original is still there, whole.
    await page.locator('[data-testid=conversation-title]', { hasText: /^Linear attention memory$/ }).click();
    await page.getByTestId('chat-title').filter({ hasText: /^Linear attention memory$/ }).waitFor();
    assert.equal(await page.locator('[data-testid=message]').count(), total);

    // A refusal is shown; nothing opens.
    await mock(page, () => window.__tpttMock.failNext('branch_conversation', 'not_found', 'Message 9 does not exist.'));
    const answer = page.locator('[data-testid=message][data-role=assistant]').first();
    await answer.hover();
    await answer.getByTestId('branch').click();
    await page.getByTestId('notice').filter({ hasText: 'Message 9 does not exist' }).waitFor();
    await page.getByTestId('chat-title').filter({ hasText: /^Linear attention memory$/ }).waitFor();
    assert.deepEqual(suite.problems(page).errors, [], 'no page errors');
  });

  test('a branch of a chat with no memory saved at that turn says it reads the conversation again', async () => {
    const { page } = await suite.open();
    await mock(page, () => window.__tpttMock.forgetSnapshots('Linear attention memory'));
    await page.locator('[data-testid=conversation-title]', { hasText: 'Linear attention memory' }).click();
    const firstAnswer = page.locator('[data-testid=message][data-role=assistant]').first();
    await firstAnswer.waitFor();
    await firstAnswer.hover();
    await firstAnswer.getByTestId('branch').click();
    await page.getByTestId('notice').filter({ hasText: 'reads the conversation again' }).waitFor();
    await page.getByTestId('chat-title').filter({ hasText: 'Linear attention memory (branch)' }).waitFor();
    assert.deepEqual(suite.problems(page).errors, [], 'no page errors');
  });
});
