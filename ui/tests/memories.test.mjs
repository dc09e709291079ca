// Saved memories: "Save memory" in a chat (a refused name shown beside the field, the dialog
// kept), the library lists it with its size and tokens, a new chat starts from it (its meter
// starts with the memory), rename, delete.
import assert from 'node:assert/strict';
import { after, afterEach, before, describe, test } from 'node:test';
import { mock, until, useSuite } from './helpers.mjs';

const suite = useSuite({ before, after, afterEach });

/** The memory meter's total: the window's fill plus what only the recurrent memory holds. */
const meterTotal = (page) =>
  page.evaluate(() => {
    const meter = document.querySelector('[data-testid=memory-meter] [role=meter]');
    const more = /([\d,]+) earlier/.exec(document.querySelector('[data-testid=memory-recurrent]')?.textContent ?? '');
    return meter ? Number(meter.getAttribute('aria-valuenow')) + (more ? Number(more[1].replace(/,/g, '')) : 0) : null;
  });

describe('memories', () => {
  test('a chat memory is saved, starts a new chat, and is renamed and deleted in the library', async () => {
    const { page } = await suite.open();
    await page.locator('[data-testid=conversation-title]', { hasText: 'Linear attention memory' }).click();
    await page.getByTestId('chat-title').filter({ hasText: 'Linear attention memory' }).waitFor();
    const before = await meterTotal(page);
    assert.ok(before > 0, `the chat's memory holds ${before} tokens`);

    await page.getByTestId('save-memory').click();
    const name = page.getByTestId('memory-name');
    assert.equal(await name.inputValue(), 'Linear attention memory', 'the chat title is proposed');
    await name.fill('   ');
    assert.equal(await page.getByTestId('memory-save').isDisabled(), true, 'no empty name');
    // A refusal stays in the dialog, beside the field, with the name as typed.
    await name.fill('Papers on linear attention');
    await mock(page, () => window.__tpttMock.failNext('save_memory', 'invalid_settings', 'name: at most 200 characters'));
    await page.getByTestId('memory-save').click();
    await page.getByTestId('memory-save-error').filter({ hasText: 'at most 200 characters' }).waitFor();
    assert.equal(await name.inputValue(), 'Papers on linear attention');
    await page.getByTestId('memory-save').click();
    await page.getByTestId('notice').filter({ hasText: 'Memory saved' }).waitFor();

    // The library: its name, tokens and size.
    await page.getByTestId('nav-memories').click();
    const item = page.getByTestId('memory');
    await item.waitFor();
    assert.equal(await item.getByTestId('memory-name').textContent(), 'Papers on linear attention');
    const tokens = Number((await item.getByTestId('memory-tokens').textContent()).replace(/\D/g, ''));
    assert.equal(tokens, before, 'the memory holds what the chat had read');
    assert.match(await item.textContent(), / [\d.]+ (KB|MB|GB) /, "its size on disk");

    // A new chat from it: titled as the memory, its meter starting with what the memory read.
    await item.getByTestId('memory-new-chat').click();
    await page.getByTestId('chat-title').filter({ hasText: 'Papers on linear attention' }).waitFor();
    await until(page, (n) => {
      const meter = document.querySelector('[data-testid=memory-meter] [role=meter]');
      return meter && Number(meter.getAttribute('aria-valuenow')) > 0 && n > 0;
    }, tokens);
    assert.equal(await meterTotal(page), tokens);
    assert.equal(await page.locator('[data-testid=message]').count(), 0, 'a new chat, no messages');

    // Rename and delete in the library.
    await page.getByTestId('nav-memories').click();
    await page.getByRole('button', { name: 'Rename Papers on linear attention' }).click();
    await page.getByTestId('memory-rename-input').fill('Linear attention papers');
    await page.getByRole('button', { name: 'Rename', exact: true }).click();
    await page.getByTestId('memory-name').filter({ hasText: 'Linear attention papers' }).waitFor();
    await page.getByRole('button', { name: 'Delete Linear attention papers' }).click();
    await page.getByTestId('confirm-delete-memory').click();
    await page.getByTestId('no-memories').waitFor();
    assert.deepEqual(suite.problems(page).errors, [], 'no page errors');
  });
});
