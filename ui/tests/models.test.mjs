// The model manager and the first-run path: the no-model empty state, listing variants, a
// download with progress then cancel, a download to the end, failures with a way forward, add by
// repo id, import of a local folder.
import assert from 'node:assert/strict';
import { after, afterEach, before, describe, test } from 'node:test';
import { mock, until, useSuite } from './helpers.mjs';

const suite = useSuite({ before, after, afterEach });
const GEMMA = 'ffurfaro/Titanesque-gemma-3-270m';

function clean(page) {
  const p = suite.problems(page);
  assert.deepEqual(p.errors, []);
  assert.deepEqual(p.dialogs, []);
}

const card = (page, repo) => page.locator(`[data-testid=model-card][data-repo="${repo}"]`);
const variantRow = (page, repo, name) => card(page, repo).locator(`[data-testid=variant][data-variant="${name}"]`);

describe('models', () => {
  test('with no model the chat points to the model manager, and sending says why', async () => {
    const { page } = await suite.open({ scenario: 'empty' });
    const empty = page.getByTestId('no-model');
    await empty.waitFor();
    assert.match(await empty.textContent(), /No model yet/);
    // what the user writes is kept, and sending explains the way forward
    await page.getByTestId('composer').fill('Hello?');
    await page.getByTestId('composer').press('Enter');
    const notice = page.getByTestId('notice').filter({ hasText: 'No model is ready yet' });
    await notice.waitFor();
    assert.equal(await page.getByTestId('composer').inputValue(), 'Hello?');
    await page.getByTestId('open-models').click();
    await page.getByRole('heading', { name: 'Models', level: 1 }).waitFor();
    clean(page);
  });

  test('a download shows bytes, speed and progress, and can be cancelled', async () => {
    const { page } = await suite.open({ scenario: 'empty' });
    await mock(page, () => window.__tpttMock.setTiming({ downloadTicks: 200, downloadTickMs: 50 }));
    await page.getByTestId('nav-models').click();
    await card(page, GEMMA).getByTestId('list-variants').click();
    const row = variantRow(page, GEMMA, 'delta_rule');
    await row.getByRole('button', { name: 'Download' }).click();
    const progress = row.getByRole('progressbar');
    await progress.waitFor();
    await until(page, () => Number(document.querySelector('[data-variant=delta_rule] [role=progressbar]')?.getAttribute('aria-valuenow')) > 0);
    const first = Number(await progress.getAttribute('aria-valuenow'));
    await page.waitForTimeout(400);
    const second = Number(await progress.getAttribute('aria-valuenow'));
    assert.ok(second > first, `progress advances: ${first} → ${second}`);
    assert.match(await row.getByTestId('download-bytes').textContent(), /^\d+(\.\d)? [KMG]?B of \d+ MB$/);
    assert.match(await row.getByTestId('download-speed').textContent(), /^\d+(\.\d)? [KMG]?B\/s$/);

    await row.getByRole('button', { name: 'Cancel' }).click();
    await row.getByRole('button', { name: 'Download' }).waitFor();
    assert.equal(await row.getByRole('progressbar').count(), 0);
    const v = await mock(page, () => window.__tpttMock.state.models[0].variants.find((x) => x.name === 'delta_rule'));
    assert.equal(v.downloaded, false);
    assert.ok((await mock(page, () => window.__tpttMock.calls.map((c) => c.command))).includes('cancel_download'));
    clean(page);
  });

  test('a finished download becomes the model in use and the chat opens up', async () => {
    const { page } = await suite.open({ scenario: 'empty' });
    await mock(page, () => window.__tpttMock.setTiming({ downloadTicks: 8, downloadTickMs: 30 }));
    await page.getByTestId('nav-models').click();
    await card(page, GEMMA).getByTestId('list-variants').click();
    const row = variantRow(page, GEMMA, 'delta_product');
    await row.getByRole('button', { name: 'Download' }).click();
    await row.getByText('In use').waitFor();
    await page.getByTestId('notice').filter({ hasText: 'Download complete' }).waitFor();
    await page.getByTestId('nav-chat').click();
    await page.getByTestId('welcome').waitFor();
    assert.equal(await page.getByTestId('model-chip-variant').textContent(), 'delta_product');
    clean(page);
  });

  test('download failures say what happened and offer retry, dismiss or settings', async () => {
    const { page } = await suite.open({ scenario: 'empty' });
    await mock(page, () => {
      window.__tpttMock.setTiming({ downloadTicks: 10, downloadTickMs: 20 });
      window.__tpttMock.failDownload(0.5, 'disk_full', 'No space left on device.');
    });
    await page.getByTestId('nav-models').click();
    await card(page, GEMMA).getByTestId('list-variants').click();
    const row = variantRow(page, GEMMA, 'delta_rule');
    await row.getByRole('button', { name: 'Download' }).click();
    const error = row.getByTestId('download-error');
    await error.waitFor();
    assert.match(await error.textContent(), /The disk is full\. No space left on device\./);
    await error.getByRole('button', { name: 'Retry' }).click();
    await row.getByText('In use').waitFor();

    // A gated base without a token: the way forward is the settings' token field.
    const llama = 'ffurfaro/Titans-Llama-3.2-1B';
    await card(page, llama).getByTestId('list-variants').click();
    const gated = variantRow(page, llama, 'delta_rule');
    await gated.getByRole('button', { name: 'Download' }).click();
    const authError = gated.getByTestId('download-error');
    await authError.waitFor();
    assert.match(await authError.textContent(), /A Hugging Face token is needed/);
    await authError.getByRole('button', { name: 'Dismiss' }).click();
    await gated.getByRole('button', { name: 'Download' }).waitFor();
    await gated.getByRole('button', { name: 'Download' }).click();
    await gated.getByTestId('download-error').getByRole('button', { name: 'Open settings' }).click();
    await page.getByTestId('hf-token').waitFor();

    // A listing that fails (offline) can be retried.
    await page.getByTestId('nav-models').click();
    await mock(page, () => window.__tpttMock.failNext('refresh_variants', 'network', 'Connection refused.'));
    const olmo = card(page, 'ffurfaro/Titans-OLMo-1B-hf');
    await olmo.getByTestId('list-variants').click();
    await olmo.getByRole('alert').filter({ hasText: 'Hugging Face cannot be reached' }).waitFor();
    await olmo.getByRole('alert').getByRole('button', { name: 'Retry' }).click();
    await olmo.locator('[data-testid=variant]').first().waitFor();
    clean(page);
  });

  test('add by repo id and import a local folder, with clear errors for bad input', async () => {
    const { page } = await suite.open();
    await page.getByTestId('nav-models').click();
    const repo = page.getByTestId('add-repo');
    await mock(page, () =>
      window.__tpttMock.failNext('add_model', 'invalid_repo_id', '"not a repo id" is not of the form owner/name.'),
    );
    await repo.fill('not a repo id');
    await repo.press('Enter');
    await page.getByRole('alert').filter({ hasText: 'That is not a repository id' }).waitFor();
    assert.equal(await repo.getAttribute('aria-invalid'), 'true');
    await repo.fill('someone/Titans-Custom-1B');
    await repo.press('Enter');
    const added = card(page, 'someone/Titans-Custom-1B');
    await added.locator('[data-testid=variant]').first().waitFor();
    assert.equal(await repo.inputValue(), '');

    const folder = page.getByTestId('import-path');
    await folder.fill('/home/me/not-tptt');
    await folder.press('Enter');
    await page.getByRole('alert').filter({ hasText: 'That folder is not a TPTT model' }).waitFor();
    await folder.fill('/home/me/models/my-tptt');
    await folder.press('Enter');
    const local = card(page, '/home/me/models/my-tptt');
    await local.waitFor();
    assert.match(await local.textContent(), /Local folder/);
    await local.getByRole('button', { name: 'Use' }).click();
    await local.getByText('In use').waitFor();
    clean(page);
  });

  test('a folder chosen in the native folder dialog is imported at once; a cancelled one is not', async () => {
    const { page } = await suite.open();
    await page.getByTestId('nav-models').click();
    const choose = page.getByTestId('choose-folder');
    // Cancelled (the mock's folder dialog answers null by default): nothing is imported.
    await choose.click();
    await until(page, () => window.__tpttMock.calls.some((c) => c.command === 'pick_model_folder'));
    assert.ok(!(await mock(page, () => window.__tpttMock.calls.some((c) => c.command === 'import_local_model'))));
    assert.equal(await page.getByTestId('import-path').inputValue(), '');

    await mock(page, () => window.__tpttMock.setDialogAnswer('/home/me/models/picked-tptt'));
    await choose.click();
    const local = card(page, '/home/me/models/picked-tptt');
    await local.waitFor();
    assert.match(await local.textContent(), /Local folder/);
    const imported = await mock(page, () => window.__tpttMock.calls.filter((c) => c.command === 'import_local_model'));
    assert.deepEqual(imported.map((c) => c.args.path), ['/home/me/models/picked-tptt']);

    // A folder that is no TPTT model: the same error as a typed path.
    await mock(page, () => window.__tpttMock.setDialogAnswer('/home/me/not-tptt'));
    await choose.click();
    await page.getByRole('alert').filter({ hasText: 'That folder is not a TPTT model' }).waitFor();
    clean(page);
  });

  test('a variant’s size includes the base it needs', async () => {
    const { page } = await suite.open({ scenario: 'empty' });
    await page.getByTestId('nav-models').click();
    await card(page, GEMMA).getByTestId('list-variants').click();
    // 12 MB of its own + the 540 MB Gemma base.
    const size = variantRow(page, GEMMA, 'delta_rule').getByTestId('variant-size');
    await size.waitFor();
    assert.match(await size.textContent(), /delta_rule\s+·\s+552 MB with its base/);
    assert.match(await size.locator('span').getAttribute('title'), /12\.0 MB of its own, and the base model \(540 MB/);
    clean(page);
  });

  test('an imported model is chosen when no model is, and not when one is', async () => {
    const { page } = await suite.open({ scenario: 'empty' });
    await page.getByTestId('nav-models').click();
    const folder = page.getByTestId('import-path');
    await folder.fill('/home/me/models/demo-smollm2-tptt');
    await folder.press('Enter');
    const local = card(page, '/home/me/models/demo-smollm2-tptt');
    await local.getByTestId('variant-in-use').waitFor();
    await page.getByTestId('notice').filter({ hasText: 'delta_rule is in use' }).waitFor();
    // A variant of 909 bytes that needs a 540 MB base.
    assert.match(await local.getByTestId('variant-size').textContent(), /540 MB with its base/);
    const chosen = await mock(page, () => window.__tpttMock.state.settings);
    assert.deepEqual([chosen.modelRepo, chosen.variant], ['/home/me/models/demo-smollm2-tptt', 'delta_rule']);
    await page.getByTestId('nav-chat').click();
    await page.getByTestId('model-chip').waitFor();

    // With a model chosen, an import leaves the choice alone.
    await page.getByTestId('nav-models').click();
    await folder.fill('/home/me/models/another');
    await folder.press('Enter');
    await page.getByTestId('notice').filter({ hasText: 'choose a variant with' }).waitFor();
    assert.equal((await mock(page, () => window.__tpttMock.state.settings)).modelRepo, '/home/me/models/demo-smollm2-tptt');
    clean(page);
  });

  test('a TPTT repo found in the Hugging Face cache is listed as such and used without a download', async () => {
    const { page } = await suite.open({ scenario: 'empty' });
    const repo = 'someone/Titans-Tiny';
    // What list_models gives for a repo another tool downloaded (source "cache", variants known).
    await mock(page, (id) => {
      window.__tpttMock.state.models.push({
        repoId: id,
        title: 'Titans-Tiny',
        source: 'cache',
        description: 'Found in your Hugging Face cache (/home/me/.cache/huggingface/hub): usable without downloading.',
        variants: [{ name: 'delta_rule', operatorMode: 'delta_rule', downloaded: true, sizeBytes: 4 * 1024 * 1024 }],
        baseModel: 'someone/tiny-base',
        baseSizeBytes: 500 * 1000 * 1000,
      });
    }, repo);
    await page.getByTestId('nav-models').click();
    const cached = card(page, repo);
    await cached.waitFor();
    assert.match(await cached.textContent(), /Hugging Face cache/);
    const row = variantRow(page, repo, 'delta_rule');
    assert.equal(await row.getByTestId('variant-download').count(), 0, 'nothing to download');
    await row.getByTestId('variant-use').click();
    await row.getByTestId('variant-in-use').waitFor();
    const chosen = await mock(page, () => window.__tpttMock.state.settings);
    assert.deepEqual([chosen.modelRepo, chosen.variant], [repo, 'delta_rule']);
    const calls = await mock(page, () => window.__tpttMock.calls.map((c) => c.command));
    assert.ok(!calls.includes('download_variant'), `no download: ${calls}`);
    clean(page);
  });
});
