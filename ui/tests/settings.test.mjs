// Settings: switching variant (takes effect on the next message), device facts, validation
// errors by field, theme, the write-only Hugging Face token, the logs folder, and the local API
// server (on/off, port, key, its status).
import assert from 'node:assert/strict';
import { after, afterEach, before, describe, test } from 'node:test';
import { mock, useSuite } from './helpers.mjs';

const suite = useSuite({ before, after, afterEach });

function clean(page) {
  const p = suite.problems(page);
  assert.deepEqual(p.errors, []);
  assert.deepEqual(p.dialogs, []);
}

describe('settings', () => {
  test('switching the variant applies to the next message and the chat says its memory is rebuilt', async () => {
    const { page } = await suite.open();
    await page.getByTestId('conversation-title').filter({ hasText: 'Linear attention memory' }).click();
    await page.getByTestId('model-chip-variant').filter({ hasText: 'delta_rule' }).waitFor();
    assert.equal(await page.getByTestId('variant-banner').count(), 0);

    await page.getByTestId('nav-settings').click();
    const variant = page.getByTestId('settings-variant');
    assert.deepEqual(await variant.locator('option').allTextContents(), ['delta_rule', 'delta_product']);
    await variant.selectOption('delta_product');
    await page.getByTestId('save-settings').click();
    await page.getByTestId('notice').filter({ hasText: 'Settings saved' }).waitFor();
    const saved = await mock(page, () => window.__tpttMock.state.settings.variant);
    assert.equal(saved, 'delta_product');

    await page.getByTestId('nav-chat').click();
    await page.getByTestId('model-chip-variant').filter({ hasText: 'delta_product' }).waitFor();
    await page.getByTestId('variant-banner').filter({ hasText: 'rebuilt' }).waitFor();
    await page.getByTestId('composer').fill('Continue with the new variant');
    await page.getByTestId('composer').press('Enter');
    await page.locator('[data-testid=message][data-role=assistant][data-status=complete]').last().waitFor();
    const conv = await mock(page, () => window.__tpttMock.state.conversations.find((c) => c.id === 'c-memory'));
    assert.equal(conv.variant, 'delta_product', 'the next message used the new variant');
    clean(page);
  });

  test('device: compiled-in devices and the one in use; missing ones cannot be picked', async () => {
    const { page } = await suite.open();
    await page.getByTestId('nav-settings').click();
    const info = page.getByTestId('device-info');
    await info.waitFor();
    assert.match(await info.textContent(), /In use: CUDA.*Compiled in:\s+CPU, CUDA/s);
    const group = page.getByRole('radiogroup', { name: 'Device' });
    assert.equal(await group.getByRole('radio', { name: 'Metal' }).isDisabled(), true);
    await group.getByRole('radio', { name: 'CPU' }).check();
    await page.getByTestId('save-settings').click();
    await page.getByTestId('notice').filter({ hasText: 'Settings saved' }).waitFor();
    await page.getByTestId('device-info').filter({ hasText: 'In use: CPU' }).waitFor();
    clean(page);
  });

  test('a value the backend rejects is shown beside its field; Revert restores', async () => {
    const { page } = await suite.open();
    await page.getByTestId('nav-settings').click();
    const temperature = page.getByTestId('sampling-temperature');
    await temperature.fill('9');
    // The backend's refusal (its rule is tested in Rust; the mock keeps no value rules).
    await mock(page, () =>
      window.__tpttMock.failNext('set_settings', 'invalid_settings', 'temperature: must be between 0 and 5'),
    );
    await page.getByTestId('save-settings').click();
    await page.getByRole('alert').filter({ hasText: 'temperature: must be between 0 and 5' }).waitFor();
    assert.equal(await temperature.getAttribute('aria-invalid'), 'true');
    assert.equal(await mock(page, () => window.__tpttMock.state.settings.sampling.temperature), 0.7);
    await temperature.fill('');
    await page.getByTestId('save-settings').click();
    await page.getByRole('alert').filter({ hasText: 'temperature: a number is needed' }).waitFor();
    await page.getByRole('button', { name: 'Revert' }).click();
    assert.equal(await temperature.inputValue(), '0.7');

    await page.getByTestId('window-size').fill('1024');
    await page.getByTestId('save-settings').click();
    await page.getByTestId('notice').filter({ hasText: 'Settings saved' }).waitFor();
    assert.equal(await mock(page, () => window.__tpttMock.state.settings.windowSize), 1024);
    clean(page);
  });

  test('theme: dark, light and system are applied at once', async () => {
    const { page } = await suite.open();
    await page.emulateMedia({ colorScheme: 'light' });
    await page.getByTestId('nav-settings').click();
    const group = page.getByRole('radiogroup', { name: 'Theme' });
    const bg = () => page.evaluate(() => getComputedStyle(document.body).backgroundColor);
    const light = await bg();
    await group.getByRole('radio', { name: 'Dark' }).check();
    await page.getByTestId('save-settings').click();
    await page.waitForFunction(() => document.documentElement.dataset.theme === 'dark');
    const dark = await bg();
    assert.notEqual(dark, light);
    await group.getByRole('radio', { name: 'System' }).check();
    await page.getByTestId('save-settings').click();
    await page.waitForFunction(() => document.documentElement.dataset.theme === 'system');
    assert.equal(await bg(), light);
    await page.emulateMedia({ colorScheme: 'dark' });
    assert.equal(await bg(), dark, 'system follows the OS');
    clean(page);
  });

  test('the Hugging Face token is write-only', async () => {
    const { page } = await suite.open();
    await page.getByTestId('nav-settings').click();
    const token = page.getByTestId('hf-token');
    assert.equal(await token.getAttribute('type'), 'password');
    await page.getByTestId('token-state').filter({ hasText: 'No token saved' }).waitFor();
    const secret = 'hf_SecretTokenValue1234567890';
    await token.fill(secret);
    await token.press('Enter');
    await page.getByTestId('token-state').filter({ hasText: 'A token is saved' }).waitFor();
    assert.equal(await token.inputValue(), '', 'the field is emptied once saved');
    assert.equal(await mock(page, () => window.__tpttMock.state.hfToken), secret);
    const html = await page.content();
    assert.ok(!html.includes(secret), 'the token appears nowhere in the page');
    const readBack = await mock(page, () => window.__tpttMock.calls.filter((c) => c.command === 'get_settings').length);
    assert.ok(readBack >= 1);
    await page.getByRole('button', { name: 'Remove' }).click();
    await page.getByTestId('token-state').filter({ hasText: 'No token saved' }).waitFor();
    assert.equal(await mock(page, () => window.__tpttMock.state.hfToken), null);
    clean(page);
  });

  test('"Open logs folder" opens the app\'s log folder and shows where it is', async () => {
    const { page } = await suite.open();
    await page.getByTestId('nav-settings').click();
    assert.equal(await page.getByTestId('logs-path').count(), 0);
    await page.getByTestId('open-logs').click();
    await page.getByTestId('logs-path').filter({ hasText: '/home/user/.local/share/tptt-chat/logs' }).waitFor();
    assert.deepEqual(await mock(page, () => window.__tpttMock.openedFolders), ['/home/user/.local/share/tptt-chat/logs']);

    await mock(page, () => window.__tpttMock.failNext('open_logs_folder', 'internal', 'No file manager.'));
    await page.getByTestId('open-logs').click();
    await page.getByTestId('notice').filter({ hasText: 'No file manager.' }).waitFor();
    clean(page);
  });

  test('the local API server: off by default, a port in use says so, then it listens with the model id', async () => {
    const { page } = await suite.open();
    await page.getByTestId('nav-settings').click();
    const status = page.getByTestId('api-status');
    await status.filter({ hasText: 'Off.' }).waitFor();
    assert.equal(await page.getByTestId('api-enabled').isChecked(), false);

    // An emptied port is caught before anything is sent.
    await page.getByTestId('api-enabled').check();
    await page.getByTestId('api-port').fill('');
    await page.getByTestId('save-settings').click();
    await page.getByTestId('api-server').getByRole('alert').filter({ hasText: 'port number' }).waitFor();
    assert.equal(await mock(page, () => window.__tpttMock.state.settings.apiServer.enabled), false, 'nothing was sent');

    // A port another program holds: saved, and the status says why it is not running.
    await page.getByTestId('api-port').fill('8080');
    await page.getByTestId('save-settings').click();
    await status.filter({ hasText: 'Not running: Port 8080 is already in use' }).waitFor();

    // Another port and a key: it listens, with the address and the model id to give clients.
    await page.getByTestId('api-port').fill('9000');
    await page.getByTestId('api-key').fill('sk-local');
    assert.equal(await page.getByTestId('api-key').getAttribute('type'), 'password', 'the key is hidden until asked');
    await page.getByTestId('save-settings').click();
    await page.getByTestId('api-url').filter({ hasText: 'http://127.0.0.1:9000/v1' }).waitFor();
    const modelId = await page.getByTestId('api-model').textContent();
    const s = await mock(page, () => window.__tpttMock.state.settings);
    assert.equal(modelId, `${s.modelRepo}/${s.variant}`);
    assert.deepEqual(s.apiServer, { enabled: true, port: 9000, apiKey: 'sk-local' });

    // A key the backend refuses is shown beside its field.
    await mock(page, () =>
      window.__tpttMock.failNext('set_settings', 'invalid_settings', 'apiServer.apiKey: a key is one word of printable ASCII characters, at most 256'),
    );
    await page.getByTestId('api-key').fill('two words');
    await page.getByTestId('save-settings').click();
    await page.getByTestId('api-server').getByRole('alert').filter({ hasText: 'printable ASCII' }).waitFor();

    // Reopened, the saved values and the status are there.
    await page.getByRole('button', { name: 'Revert' }).click();
    await page.getByTestId('nav-chat').click();
    await page.getByTestId('nav-settings').click();
    assert.equal(await page.getByTestId('api-port').inputValue(), '9000');
    await page.getByTestId('api-url').waitFor();
    clean(page);
  });

  test('memory precision: automatic by default, 8-bit saved', async () => {
    const { page } = await suite.open();
    await page.getByTestId('nav-settings').click();
    const kv = page.getByTestId('kv-format');
    assert.equal(await kv.inputValue(), 'auto');
    assert.deepEqual(await kv.locator('option').allTextContents(), [
      'Automatic (8-bit where the model allows)',
      '8-bit (q8_0)',
      'Compact (f16)',
      'Exact (f32)',
    ]);
    await kv.selectOption('q8_0');
    await page.getByTestId('save-settings').click();
    await page.getByTestId('notice').filter({ hasText: 'Settings saved' }).waitFor();
    assert.equal(await mock(page, () => window.__tpttMock.state.settings.kvFormat), 'q8_0');
    clean(page);
  });
});
