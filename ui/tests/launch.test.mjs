// The app started again with `--model` while it runs: the backend follows the new command line
// and emits a `launch` event; the UI reloads what changed and says so, or says why not.
import assert from 'node:assert/strict';
import { after, afterEach, before, describe, test } from 'node:test';
import { mock, useSuite } from './helpers.mjs';

const suite = useSuite({ before, after, afterEach });

describe('a later launch', () => {
  test("its --model becomes the model in use, and the UI says so; one that failed is explained", async () => {
    const { page } = await suite.open();
    const variant = page.getByTestId('model-chip-variant');
    await variant.waitFor();
    const before = (await variant.textContent()).trim();
    const other = before === 'delta_product' ? 'delta_rule' : 'delta_product';
    const repoId = await mock(page, () => window.__tpttMock.state.settings.modelRepo);
    await mock(page, (ev) => window.__tpttMock.launchAgain(ev), { kind: 'modelChosen', repoId, variant: other });
    await page.getByTestId('notice').filter({ hasText: 'Model chosen' }).waitFor();
    await page.getByTestId('model-chip-variant').filter({ hasText: other }).waitFor();

    await mock(page, (ev) => window.__tpttMock.launchAgain(ev), {
      kind: 'error',
      message: '--model /gone: /gone is not a folder.',
    });
    await page.getByTestId('notice').filter({ hasText: '/gone is not a folder' }).waitFor();
    assert.equal((await page.getByTestId('model-chip-variant').textContent()).trim(), other, 'nothing changed');
    const p = suite.problems(page);
    assert.deepEqual(p.errors, [], 'no page errors');
  });
});
