// The conversation list: search (titles and message text), rename, delete, export (native save
// dialog), pin and archive.
import assert from 'node:assert/strict';
import { after, afterEach, before, describe, test } from 'node:test';
import { mock, until, useSuite } from './helpers.mjs';

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

  test('export writes Markdown and JSON files chosen in the native save dialog', async () => {
    const { page } = await suite.open();
    await page.getByTestId('conversation').first().waitFor();
    await menu(page, 'Trip to Lisbon', 'Export Markdown');
    await page.getByTestId('notice').filter({ hasText: 'Saved to /home/user/Documents/Trip to Lisbon.md' }).waitFor();
    let saved = await mock(page, () => window.__tpttMock.savedFiles);
    assert.equal(saved.length, 1);
    assert.equal(saved[0].path, '/home/user/Documents/Trip to Lisbon.md');
    assert.match(saved[0].text, /^# Trip to Lisbon/);
    assert.match(saved[0].text, /Alfama, Belém and the LX Factory\./);

    await mock(page, () => window.__tpttMock.setDialogAnswer('/tmp/lisbon.json'));
    await menu(page, 'Trip to Lisbon', 'Export JSON');
    await page.getByTestId('notice').filter({ hasText: 'Saved to /tmp/lisbon.json' }).waitFor();
    saved = await mock(page, () => window.__tpttMock.savedFiles);
    assert.equal(saved.length, 2);
    const parsed = JSON.parse(saved[1].text);
    assert.equal(parsed.id, 'c-lisbon');
    assert.equal(parsed.messages.length, 2);
    // No webview download is offered any more.
    assert.equal(await page.locator('a[download]').count(), 0);

    // Cancelling the dialog writes nothing and says nothing.
    await mock(page, () => window.__tpttMock.setDialogAnswer(null));
    const savedNotices = page.getByTestId('notice').filter({ hasText: 'Saved to' });
    const shown = await savedNotices.count();
    await menu(page, 'Trip to Lisbon', 'Export Markdown');
    await until(page, () => window.__tpttMock.calls.filter((c) => c.command === 'save_conversation').length === 3);
    assert.equal((await mock(page, () => window.__tpttMock.savedFiles)).length, 2);
    assert.ok((await savedNotices.count()) <= shown, 'a cancelled export says nothing');

    await mock(page, () => window.__tpttMock.failNext('save_conversation', 'database', 'disk I/O error'));
    await menu(page, 'Trip to Lisbon', 'Export JSON');
    const notice = page.getByTestId('notice').filter({ hasText: 'disk I/O error' });
    await notice.waitFor();
    await notice.getByRole('button', { name: 'Retry' }).waitFor();
    clean(page);
  });

  test('a pinned chat comes first; an archived one leaves the list for the archived one and comes back', async () => {
    const { page } = await suite.open();
    await page.getByTestId('conversation').first().waitFor();
    assert.deepEqual(await titles(page), ['Linear attention memory', 'Rust borrow checker tips', 'Trip to Lisbon']);
    await menu(page, 'Trip to Lisbon', 'Pin');
    await until(page, () => document.querySelector('[data-testid=conversation-title]')?.textContent === 'Trip to Lisbon');
    assert.deepEqual(await titles(page), ['Trip to Lisbon', 'Linear attention memory', 'Rust borrow checker tips']);
    const pinned = page.getByTestId('conversation').filter({ hasText: 'Trip to Lisbon' }).getByTestId('pinned');
    await pinned.waitFor();

    await menu(page, 'Linear attention memory', 'Archive');
    await page.getByTestId('notice').filter({ hasText: 'Chat archived' }).waitFor();
    assert.deepEqual(await titles(page), ['Trip to Lisbon', 'Rust borrow checker tips']);
    await page.getByTestId('show-archived').click();
    await until(page, () => document.querySelectorAll('[data-testid=conversation]').length === 1);
    assert.deepEqual(await titles(page), ['Linear attention memory']);
    // An archived chat still opens.
    await page.locator('[data-testid=conversation-title]', { hasText: 'Linear attention memory' }).click();
    await page.getByTestId('chat-title').filter({ hasText: 'Linear attention memory' }).waitFor();
    await menu(page, 'Linear attention memory', 'Unarchive');
    await page.getByTestId('notice').filter({ hasText: 'Chat restored' }).waitFor();
    await page.getByTestId('no-conversations').filter({ hasText: 'No archived chats.' }).waitFor();
    await page.getByTestId('show-archived').click();
    await until(page, () => document.querySelectorAll('[data-testid=conversation]').length === 3);
    assert.deepEqual(await titles(page), ['Trip to Lisbon', 'Linear attention memory', 'Rust borrow checker tips']);

    // Unpinned: back among the others by recency. A refusal is shown, nothing moves.
    await menu(page, 'Trip to Lisbon', 'Unpin');
    await until(page, () => !document.querySelector('[data-testid=pinned]'));
    await mock(page, () => window.__tpttMock.failNext('set_conversation_archived', 'database', 'The database is read-only.'));
    await menu(page, 'Rust borrow checker tips', 'Archive');
    await page.getByTestId('notice').filter({ hasText: 'The database is read-only' }).waitFor();
    assert.equal((await titles(page)).length, 3);
    clean(page);
  });
});
