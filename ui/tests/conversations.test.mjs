// The conversation list: search (titles and message text), rename, delete, export.
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { after, afterEach, before, describe, test } from 'node:test';
import { mock, useSuite } from './helpers.mjs';

const suite = useSuite({ before, after, afterEach });
const titles = (page) => page.getByTestId('conversation-title').allTextContents();

async function menu(page, title, action) {
  const row = page.getByTestId('conversation').filter({ hasText: title });
  await row.getByRole('button', { name: `Actions for ${title}` }).click();
  await row.getByRole('menuitem', { name: action }).click();
}

function clean(page) {
  const p = suite.problems(page);
  assert.deepEqual(p.errors, []);
  assert.deepEqual(p.dialogs, []);
}

describe('conversations', () => {
  test('search filters by title and by message text, and says when nothing matches', async () => {
    const { page } = await suite.open();
    await page.getByTestId('conversation').first().waitFor();
    assert.deepEqual(await titles(page), ['Linear attention memory', 'Rust borrow checker tips', 'Trip to Lisbon']);
    const search = page.getByTestId('search');
    await search.fill('lisbon');
    await page.waitForFunction(() => document.querySelectorAll('[data-testid=conversation]').length === 1);
    assert.deepEqual(await titles(page), ['Trip to Lisbon']);
    await search.fill('exclusive'); // only in an answer of the Rust chat
    await page.waitForFunction(() => document.querySelector('[data-testid=conversation-title]')?.textContent === 'Rust borrow checker tips');
    assert.deepEqual(await titles(page), ['Rust borrow checker tips']);
    await search.fill('zebra crossing');
    await page.getByTestId('no-conversations').filter({ hasText: 'No chat matches' }).waitFor();
    await search.press('Escape');
    await page.waitForFunction(() => document.querySelectorAll('[data-testid=conversation]').length === 3);
    assert.equal(await search.inputValue(), '');
    clean(page);
  });

  test('rename from the menu updates the list, the header and the backend', async () => {
    const { page } = await suite.open();
    await page.getByTestId('conversation-title').filter({ hasText: 'Trip to Lisbon' }).click();
    await page.getByTestId('chat-title').filter({ hasText: 'Trip to Lisbon' }).waitFor();
    await menu(page, 'Trip to Lisbon', 'Rename');
    const input = page.getByTestId('rename-input');
    await input.fill('Lisbon in May');
    await input.press('Enter');
    await page.getByTestId('conversation-title').filter({ hasText: 'Lisbon in May' }).waitFor();
    assert.equal(await page.getByTestId('chat-title').textContent(), 'Lisbon in May');
    const stored = await mock(page, () => window.__tpttMock.state.conversations.find((c) => c.id === 'c-lisbon').title);
    assert.equal(stored, 'Lisbon in May');

    // Esc cancels a rename without touching anything
    await menu(page, 'Lisbon in May', 'Rename');
    await page.getByTestId('rename-input').fill('Something else');
    await page.keyboard.press('Escape');
    await page.waitForFunction(() => !document.querySelector('dialog[open]'));
    assert.ok((await titles(page)).includes('Lisbon in May'));
    clean(page);
  });

  test('delete asks first, removes the chat and leaves an open one for a new chat', async () => {
    const { page } = await suite.open();
    await page.getByTestId('conversation-title').filter({ hasText: 'Rust borrow checker tips' }).click();
    await page.getByTestId('chat-title').filter({ hasText: 'Rust borrow' }).waitFor();

    await menu(page, 'Rust borrow checker tips', 'Delete');
    await page.getByRole('dialog', { name: 'Delete chat?' }).getByRole('button', { name: 'Cancel' }).click();
    assert.equal((await titles(page)).length, 3, 'cancel keeps it');

    await menu(page, 'Rust borrow checker tips', 'Delete');
    await page.getByTestId('confirm-delete').click();
    await page.waitForFunction(() => document.querySelectorAll('[data-testid=conversation]').length === 2);
    assert.deepEqual(await titles(page), ['Linear attention memory', 'Trip to Lisbon']);
    assert.equal(await page.getByTestId('chat-title').textContent(), 'New chat');
    const ids = await mock(page, () => window.__tpttMock.state.conversations.map((c) => c.id));
    assert.ok(!ids.includes('c-rust'));
    clean(page);
  });

  test('export saves Markdown and JSON files', async () => {
    const { page } = await suite.open();
    await page.getByTestId('conversation').first().waitFor();
    const [md] = await Promise.all([page.waitForEvent('download'), menu(page, 'Trip to Lisbon', 'Export Markdown')]);
    assert.equal(md.suggestedFilename(), 'Trip to Lisbon.md');
    const mdText = await readFile(await md.path(), 'utf8');
    assert.match(mdText, /^# Trip to Lisbon/);
    assert.match(mdText, /Alfama, Belém and the LX Factory\./);

    const [json] = await Promise.all([page.waitForEvent('download'), menu(page, 'Trip to Lisbon', 'Export JSON')]);
    assert.equal(json.suggestedFilename(), 'Trip to Lisbon.json');
    const parsed = JSON.parse(await readFile(await json.path(), 'utf8'));
    assert.equal(parsed.id, 'c-lisbon');
    assert.equal(parsed.messages.length, 2);

    await mock(page, () => window.__tpttMock.failNext('export_conversation', 'database', 'disk I/O error'));
    await menu(page, 'Trip to Lisbon', 'Export JSON');
    const notice = page.getByTestId('notice').filter({ hasText: 'disk I/O error' });
    await notice.waitFor();
    await notice.getByRole('button', { name: 'Retry' }).waitFor();
    clean(page);
  });
});
