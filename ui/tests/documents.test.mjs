// Documents into memory: attach a file (the backend reads and checks it) from the dialog or by
// dropping it on the window, send it with a question or alone; the message shows the
// attachment, not its text; the long reading shows its progress; a refused or cancelled pick
// leaves the composer as it was.
import assert from 'node:assert/strict';
import { after, afterEach, before, describe, test } from 'node:test';
import { mock, until, useSuite } from './helpers.mjs';

const suite = useSuite({ before, after, afterEach });
const lastUser = (page) => page.locator('[data-testid=message][data-role=user]').last();
const lastAssistant = (page) => page.locator('[data-testid=message][data-role=assistant]').last();

describe('documents', () => {
  test('a document is attached, read into the memory with its progress, and shown as an attachment', async () => {
    const { page } = await suite.open({ timing: { firstTokenMs: 10, tokenMs: 5, prefillTokensPerS: 6000 } });
    await page.locator('[data-testid=conversation-title]', { hasText: 'Rust borrow checker tips' }).click();
    await page.locator('[data-testid=message]').first().waitFor();

    // Refused, then cancelled: no chip.
    await mock(page, () => window.__tpttMock.failNext('pick_document', 'invalid_settings', 'movie.mkv: is a binary file, not text'));
    await page.getByTestId('attach').click();
    await page.getByTestId('notice').filter({ hasText: 'movie.mkv: is a binary file' }).waitFor();
    await mock(page, () => window.__tpttMock.setDocument(null));
    await page.getByTestId('attach').click();
    await until(page, () => window.__tpttMock.calls.filter((c) => c.command === 'pick_document').length === 2);
    assert.equal(await page.getByTestId('composer-attachment').count(), 0);

    // Attached, removed, attached again; sent with a question.
    await mock(page, () => window.__tpttMock.setDocument(undefined));
    await page.getByTestId('attach').click();
    const chip = page.getByTestId('composer-attachment');
    await chip.filter({ hasText: 'notes.md' }).waitFor();
    assert.match(await chip.textContent(), /markdown · 47\.1 KB · 47,900 characters/);
    await chip.getByRole('button', { name: 'Remove notes.md' }).click();
    assert.equal(await chip.count(), 0);
    await page.getByTestId('attach').click();
    await chip.waitFor();
    const composer = page.getByTestId('composer');
    await composer.fill('What are the main points?');
    await composer.press('Enter');
    await page.getByTestId('prefill-progress').waitFor();
    await lastAssistant(page).and(page.locator('[data-status=complete]')).waitFor();
    const sent = lastUser(page);
    await sent.getByTestId('attachment').filter({ hasText: 'notes.md' }).waitFor();
    assert.equal(await sent.getByTestId('message-body').textContent(), 'What are the main points?');
    assert.match(await sent.getByTestId('attachment').textContent(), /tokens read/);
    assert.equal(await sent.getByRole('button', { name: 'Edit and resend' }).count(), 0, 'no edit of a document message');
    assert.equal(await chip.count(), 0, 'the chip went with the message');
    const call = await mock(page, () => window.__tpttMock.calls.filter((c) => c.command === 'send_document').at(-1));
    assert.equal(call.args.path, '/home/user/Documents/notes.md');
    assert.equal(call.args.content, 'What are the main points?');

    // A document alone: sent without a question.
    await page.getByTestId('attach').click();
    await chip.waitFor();
    assert.equal(await page.getByTestId('send').isDisabled(), false, 'a document alone can be sent');
    await composer.press('Enter');
    await lastAssistant(page).and(page.locator('[data-status=complete]')).waitFor();
    await until(page, () => document.querySelectorAll('[data-testid=message][data-role=user] [data-testid=attachment]').length === 2);
    assert.equal(await lastUser(page).getByTestId('message-body').count(), 0, 'no empty text under the attachment');
    assert.deepEqual(suite.problems(page).errors, [], 'no page errors');
  });

  test('a file dropped on the window is attached; a refused one is explained', async () => {
    const { page } = await suite.open({ timing: { firstTokenMs: 10, tokenMs: 5 } });
    await page.locator('[data-testid=conversation-title]', { hasText: 'Trip to Lisbon' }).click();
    await page.locator('[data-testid=message]').first().waitFor();
    await mock(page, () => window.__tpttMock.dropFiles(['/home/user/Videos/movie.mkv']));
    await page.getByTestId('notice').filter({ hasText: 'movie.mkv: is a binary file' }).waitFor();
    assert.equal(await page.getByTestId('composer-attachment').count(), 0);
    await mock(page, () => window.__tpttMock.dropFiles(['/home/user/Documents/itinerary.pdf', '/home/user/Documents/other.txt']));
    await page.getByTestId('composer-attachment').filter({ hasText: 'itinerary.pdf' }).waitFor();
    await page.getByTestId('notice').filter({ hasText: 'One document at a time' }).waitFor();
    const call = await mock(page, () => window.__tpttMock.calls.filter((c) => c.command === 'inspect_document').at(-1));
    assert.equal(call.args.path, '/home/user/Documents/itinerary.pdf');
    await page.getByTestId('composer').press('Enter');
    await lastAssistant(page).and(page.locator('[data-status=complete]')).waitFor();
    await lastUser(page).getByTestId('attachment').filter({ hasText: 'itinerary.pdf' }).waitFor();
    assert.deepEqual(suite.problems(page).errors, [], 'no page errors');
  });
});
