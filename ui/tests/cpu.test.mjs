// The UI must not take the model's CPU: while a model computes on the CPU nothing animates (a
// frame painted by a webview without GPU rendering is CPU taken from the model), nor with
// `prefers-reduced-motion`; the device line names the device once.
import assert from 'node:assert/strict';
import { after, afterEach, before, describe, test } from 'node:test';
import { until, useSuite } from './helpers.mjs';

const suite = useSuite({ before, after, afterEach });

function clean(page) {
  const p = suite.problems(page);
  assert.deepEqual(p.errors, [], 'no page errors');
  assert.deepEqual(p.dialogs, [], 'no dialogs');
}

/** Chooses a device in Settings and comes back to the chat. */
async function useDevice(page, name) {
  await page.getByTestId('nav-settings').click();
  await page.getByRole('radiogroup', { name: 'Device' }).getByRole('radio', { name }).check();
  await page.getByTestId('save-settings').click();
  await page.getByTestId('notice').filter({ hasText: 'Settings saved' }).waitFor();
  await page.getByTestId('nav-chat').click();
}

/** Sends a message and, while its answer is awaited (typing dots, sidebar dot), counts running animations. */
async function animationsWhileWaiting(page) {
  await page.getByTestId('composer').fill('Hello');
  await page.getByTestId('composer').press('Enter');
  await page.locator('.typing').waitFor();
  await page.locator('[data-testid=conversation] .dot').waitFor();
  const running = await page.evaluate(() => document.getAnimations().filter((a) => a.playState === 'running').length);
  await page.locator('[data-testid=message][data-role=assistant][data-status=complete]').last().waitFor({ timeout: 20_000 });
  return running;
}

describe('the UI and the model’s CPU', () => {
  test('on a GPU the waiting dots pulse; on the CPU nothing animates while the model works', async () => {
    const { page } = await suite.open({ timing: { firstTokenMs: 1500, tokenMs: 20 } });
    assert.ok((await animationsWhileWaiting(page)) > 0, 'with the model on CUDA the dots pulse');
    await useDevice(page, 'CPU');
    await until(page, () => document.querySelector('[data-testid=app]').classList.contains('calm'));
    assert.equal(await animationsWhileWaiting(page), 0, 'with the model on the CPU nothing animates');
    clean(page);
  });

  test('prefers-reduced-motion: nothing animates', async () => {
    const { page } = await suite.open({ timing: { firstTokenMs: 1500, tokenMs: 20 } });
    await page.emulateMedia({ reducedMotion: 'reduce' });
    assert.equal(await animationsWhileWaiting(page), 0);
    clean(page);
  });

  test('the device line names the device once', async () => {
    const { page } = await suite.open();
    await useDevice(page, 'CPU');
    await page.getByTestId('nav-settings').click();
    const info = page.getByTestId('device-info');
    await info.filter({ hasText: 'In use: CPU (8 threads)' }).waitFor();
    assert.doesNotMatch(await info.textContent(), /CPU \(CPU/);
    clean(page);
  });
});
