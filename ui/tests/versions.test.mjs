// Versions: regenerate and edit keep what they replace; the message shows ‹ n/total › and the
// arrows show another version (the backend swaps the continuation); versions inside a version
// come back with it; a refusal is shown and nothing changes.
import assert from 'node:assert/strict';
import { after, afterEach, before, describe, test } from 'node:test';
import { mock, until, useSuite } from './helpers.mjs';

const suite = useSuite({ before, after, afterEach });

const lastAssistant = (page) => page.locator('[data-testid=message][data-role=assistant]').last();
const bodies = (page) => page.locator('[data-testid=message] [data-testid=message-body]').allTextContents();

describe('versions', () => {
  test('regenerate and edit keep versions; the arrows switch between them', async () => {
    const { page } = await suite.open({ timing: { firstTokenMs: 10, tokenMs: 5 } });
    await page.locator('[data-testid=conversation-title]', { hasText: 'Rust borrow checker tips' }).click();
    const first = page.locator('[data-testid=message][data-role=user]').first();
    await first.waitFor();
    const original = await bodies(page);
    assert.equal(original.length, 2);
    assert.equal(await page.getByTestId('versions').count(), 0, 'no pager before there are versions');

    // Regenerate: the answer shows 2/2; ‹ brings the first answer back, › the new one.
    await mock(page, () => window.__tpttMock.setReply('A second answer.'));
    const answer = lastAssistant(page);
    await answer.hover();
    await answer.getByRole('button', { name: 'Regenerate' }).click();
    await lastAssistant(page).and(page.locator('[data-status=complete]')).waitFor();
    await lastAssistant(page).getByTestId('version-label').filter({ hasText: '2/2' }).waitFor();
    assert.equal((await bodies(page))[1].trim(), 'A second answer.');
    await lastAssistant(page).getByTestId('version-prev').click();
    await lastAssistant(page).getByTestId('version-label').filter({ hasText: '1/2' }).waitFor();
    assert.deepEqual(await bodies(page), original);
    assert.equal(await lastAssistant(page).getByTestId('version-prev').isDisabled(), true);
    await lastAssistant(page).getByTestId('version-next').click();
    await lastAssistant(page).getByTestId('version-label').filter({ hasText: '2/2' }).waitFor();
    assert.equal((await bodies(page))[1].trim(), 'A second answer.');

    // Edit the question: it shows 2/2; ‹ brings back the old question with its answers (and
    // their pager, which travelled with them).
    await mock(page, () => window.__tpttMock.setReply('An answer to the edit.'));
    await first.hover();
    await first.getByRole('button', { name: 'Edit and resend' }).click();
    await page.getByLabel('Edit your message').fill('What does &mut promise?');
    await page.getByRole('button', { name: 'Save & resend' }).click();
    await lastAssistant(page).and(page.locator('[data-status=complete]')).waitFor();
    const question = page.locator('[data-testid=message][data-role=user]').first();
    await question.getByTestId('version-label').filter({ hasText: '2/2' }).waitFor();
    assert.equal(await page.getByTestId('versions').count(), 1);
    await question.getByTestId('version-prev').click();
    await question.getByTestId('version-label').filter({ hasText: '1/2' }).waitFor();
    assert.equal((await bodies(page))[0], original[0]);
    await lastAssistant(page).getByTestId('version-label').filter({ hasText: '2/2' }).waitFor();
    const call = await mock(page, () => window.__tpttMock.calls.filter((c) => c.command === 'switch_version').at(-1));
    assert.equal(call.args.version, 1, JSON.stringify(call));

    // A refusal is shown beside nothing changing.
    await mock(page, () => window.__tpttMock.failNext('switch_version', 'busy', 'A reply is still being generated.'));
    await question.getByTestId('version-next').click();
    await page.getByTestId('notice').filter({ hasText: 'A reply is still being generated' }).waitFor();
    await question.getByTestId('version-label').filter({ hasText: '1/2' }).waitFor();
    assert.equal((await bodies(page))[0], original[0]);

    // Reopened, the pagers are as they were (the backend's versions).
    await page.locator('[data-testid=conversation-title]', { hasText: 'Linear attention memory' }).click();
    await page.getByTestId('chat-title').filter({ hasText: 'Linear attention memory' }).waitFor();
    await page.locator('[data-testid=conversation-title]', { hasText: 'Rust borrow checker tips' }).click();
    await until(page, () => document.querySelectorAll('[data-testid=version-label]').length === 2);
    const labels = await page.getByTestId('version-label').allTextContents();
    assert.deepEqual(labels.map((l) => l.trim()), ['1/2', '2/2']);
    assert.deepEqual(suite.problems(page).errors, [], 'no page errors');
  });
});
