// Backup and restore (Settings): every chat into one file, with or without their memory; a
// cancelled dialog says nothing; an import adds the chats (the list shows them); a refused file
// is explained and changes nothing.
import assert from 'node:assert/strict';
import { after, afterEach, before, describe, test } from 'node:test';
import { mock, until, useSuite } from './helpers.mjs';

const suite = useSuite({ before, after, afterEach });
const lastCall = (page, command) => mock(page, (c) => window.__tpttMock.calls.filter((x) => x.command === c).at(-1), command);

describe('backup', () => {
  test('back up all chats, import a backup, and a refused file', async () => {
    const { page } = await suite.open();
    await page.getByTestId('conversation').first().waitFor();
    await page.getByTestId('nav-settings').click();

    await page.getByTestId('backup-export').click();
    const written = page.getByTestId('notice').filter({ hasText: 'Backup written' });
    await written.waitFor();
    assert.match(await written.textContent(), /3 chats, \d+ with their memory .* in \/home\/user\/Documents\/tptt-chat-backup\.zip/);
    assert.equal((await lastCall(page, 'export_backup')).args.includeStates, true);

    // Without the memory; then a cancelled dialog: no notice, no error.
    await page.getByTestId('backup-states').uncheck();
    await page.getByTestId('backup-export').click();
    await until(page, () => document.querySelectorAll('[data-testid=notice]').length >= 2);
    assert.equal((await lastCall(page, 'export_backup')).args.includeStates, false);
    await mock(page, () => window.__tpttMock.setDialogAnswer(null));
    const before = await page.getByTestId('notice').count();
    await page.getByTestId('backup-export').click();
    await until(page, () => window.__tpttMock.calls.filter((c) => c.command === 'export_backup').length === 3);
    assert.equal(await page.getByTestId('notice').count(), before, 'a cancel says nothing');

    // Import: the chats are added to the list.
    await mock(page, () => window.__tpttMock.setDialogAnswer('/home/user/Documents/tptt-chat-backup.zip'));
    await page.getByTestId('backup-import').click();
    const imported = page.getByTestId('notice').filter({ hasText: 'Backup imported' });
    await imported.waitFor();
    assert.match(await imported.textContent(), /3 chats added/);
    await until(page, () => document.querySelectorAll('[data-testid=conversation]').length === 6);

    // A refused file: the reason shown, the list unchanged.
    await mock(page, () =>
      window.__tpttMock.failNext('import_backup', 'invalid_settings', 'This file cannot be imported: it is not a TPTT Chat backup. Nothing was changed.'),
    );
    await page.getByTestId('backup-import').click();
    await page.getByTestId('notice').filter({ hasText: 'it is not a TPTT Chat backup' }).waitFor();
    assert.equal(await page.getByTestId('conversation').count(), 6);
    assert.deepEqual(suite.problems(page).errors, [], 'no page errors');
  });
});
