// A chat's own settings: the header says whether the chat follows the app's settings; the
// dialog saves its own system prompt and sampling (sent to the backend as the contract says),
// warns that a new system prompt makes a chat with messages read itself again, shows a refused
// value beside its field, and goes back to the app's.
import assert from 'node:assert/strict';
import { after, afterEach, before, describe, test } from 'node:test';
import { mock, useSuite } from './helpers.mjs';

const suite = useSuite({ before, after, afterEach });

function clean(page) {
  const p = suite.problems(page);
  assert.deepEqual(p.errors, [], 'no page errors');
  assert.deepEqual(p.dialogs, [], 'no dialogs');
}

const lastCall = (page, command) =>
  mock(page, (c) => window.__tpttMock.calls.filter((x) => x.command === c).at(-1)?.args ?? null, command);

describe('chat settings', () => {
  test('a chat with messages gets its own system prompt and sampling, then follows the app again', async () => {
    const { page } = await suite.open();
    await page.locator('[data-testid=conversation-title]', { hasText: 'Linear attention memory' }).click();
    const chip = page.getByTestId('chat-settings');
    await chip.waitFor();
    assert.equal((await chip.textContent()).trim(), 'App settings');

    await chip.click();
    const form = page.getByTestId('chat-settings-form');
    await form.waitFor();
    assert.equal(await page.getByTestId('chat-system-prompt').isDisabled(), true, "the app's prompt is shown, not edited");
    assert.equal(await page.getByTestId('rebuild-note').count(), 0);
    await page.getByTestId('prompt-own').check();
    await page.getByTestId('chat-system-prompt').fill('Answer in French.');
    await page.getByTestId('rebuild-note').waitFor();
    await page.getByTestId('window-own').check();
    await page.getByTestId('chat-window-size').fill('2048');
    await page.getByTestId('sampling-own').check();
    await page.getByTestId('chat-sampling-maxNewTokens').fill('64');
    await page.getByTestId('chat-settings-save').click();
    await page.getByTestId('notice').filter({ hasText: 'reads this conversation again' }).waitFor();
    assert.equal(await form.isVisible(), false, 'the dialog closed');
    assert.equal((await chip.textContent()).trim(), 'Own settings');
    const sent = await lastCall(page, 'set_conversation_settings');
    assert.equal(sent.settings.systemPrompt, 'Answer in French.');
    assert.equal(sent.settings.sampling.maxNewTokens, 64);
    assert.equal(sent.settings.windowSize, 2048);
    assert.equal(sent.settings.sampling.temperature, 0.7, "its own sampling starts from the app's");

    // A value the backend refuses is shown beside its field; the dialog stays open.
    await chip.click();
    assert.equal(await page.getByTestId('chat-system-prompt').inputValue(), 'Answer in French.');
    await mock(page, () =>
      window.__tpttMock.failNext('set_conversation_settings', 'invalid_settings', 'sampling.topP: must be above 0 and at most 1, got 0'),
    );
    await page.getByTestId('chat-sampling-topP').fill('0');
    await page.getByTestId('chat-settings-save').click();
    await form.getByRole('alert').filter({ hasText: 'sampling.topP: must be above 0' }).waitFor();
    assert.equal(await page.getByTestId('chat-sampling-topP').getAttribute('aria-invalid'), 'true');
    // An emptied number is caught before anything is sent.
    const before = await mock(page, () => window.__tpttMock.calls.length);
    await page.getByTestId('chat-sampling-temperature').fill('');
    await page.getByTestId('chat-settings-save').click();
    await form.getByRole('alert').filter({ hasText: 'temperature: a number is needed' }).waitFor();
    assert.equal(await mock(page, () => window.__tpttMock.calls.length), before);

    // Back to the app's settings.
    await page.getByTestId('prompt-app').check();
    await page.getByTestId('window-app').check();
    await page.getByTestId('sampling-app').check();
    await page.getByTestId('chat-settings-save').click();
    await page.getByTestId('chat-settings').filter({ hasText: 'App settings' }).waitFor();
    const back = await lastCall(page, 'set_conversation_settings');
    assert.deepEqual(back.settings, { model: null, windowSize: null, systemPrompt: null, sampling: null });
    clean(page);
  });

  test("a chat runs on a downloaded variant of its own; the header shows it", async () => {
    const { page } = await suite.open();
    await page.locator('[data-testid=conversation-title]', { hasText: 'Linear attention memory' }).click();
    const variant = page.getByTestId('model-chip-variant');
    await variant.waitFor();
    const appVariant = (await variant.textContent()).trim();
    await page.getByTestId('chat-settings').click();
    await page.getByTestId('app-model').filter({ hasText: appVariant }).waitFor();
    await page.getByTestId('model-own').check();
    const select = page.getByTestId('chat-model');
    const other = appVariant === 'delta_product' ? 'delta_rule' : 'delta_product';
    const option = select.locator('option', { hasText: `· ${other}` });
    await select.selectOption({ label: (await option.textContent()).trim() });
    await page.getByTestId('chat-settings-save').click();
    await page.getByTestId('model-chip-variant').filter({ hasText: other }).waitFor();
    const sent = await lastCall(page, 'set_conversation_settings');
    assert.equal(sent.settings.model.variant, other);
    assert.equal(sent.settings.systemPrompt, null);
    // The chat was written with another variant: the banner says its memory will be rebuilt.
    await page.getByTestId('variant-banner').filter({ hasText: other }).waitFor();
    clean(page);
  });
});
