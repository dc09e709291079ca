// A long paste, as a user with a real model on a CPU sees it: the prompt's reading in the chat
// (tokens read of the whole, tokens/s, time left, Stop), a memory meter that follows what the
// model has read, one meaning of TTFT (live and saved; the model's loading apart; long waits in
// minutes), the composer's height after a big paste, numbers grouped without a locale, and the
// bad input around it: Stop twice, Stop while the paste is read, a paste while an answer
// streams, a paste of several megabytes.
import assert from 'node:assert/strict';
import { after, afterEach, before, describe, test } from 'node:test';
import { mock, until, useSuite } from './helpers.mjs';

const suite = useSuite({ before, after, afterEach });

function clean(page) {
  const p = suite.problems(page);
  assert.deepEqual(p.errors, [], 'no page errors');
  assert.deepEqual(p.dialogs, [], 'no dialogs');
}

const lastAssistant = (page) => page.locator('[data-testid=message][data-role=assistant]').last();
/** The mock's tokens for a user message of `chars` characters (4 a token, + 4 of template). */
const promptTokens = (chars) => Math.ceil(chars / 4) + 4;
const number = (text) => Number(text.replace(/[^\d]/g, ''));

/** What the meter shows in all: the window's fill plus the earlier tokens (null: no meter). */
function meterTotal(page) {
  return page.evaluate(() => {
    const meter = document.querySelector('[data-testid=memory-meter] [role=meter]');
    if (!meter) return null;
    const more = document.querySelector('[data-testid=memory-recurrent]')?.textContent ?? '';
    const m = /([\d,.\s]+) earlier/.exec(more);
    return Number(meter.getAttribute('aria-valuenow')) + (m ? Number(m[1].replace(/[^\d]/g, '')) : 0);
  });
}

/** The backend's (mock's) memory of conversation `id`. */
function backendMemory(page, id) {
  return mock(page, async (c) => (await window.__tpttMock.handle('get_conversation', { id: c })).memory, id);
}

/** Records, on every DOM change, the reading shown (read / total, speed, time left) and the meter. */
async function recordReading(page) {
  await page.evaluate(() => {
    const rec = [];
    window.__reading = rec;
    const read = () => {
      const p = document.querySelector('[data-testid=prefill-progress]');
      if (!p) return;
      const meter = document.querySelector('[data-testid=memory-meter] [role=meter]');
      const more = document.querySelector('[data-testid=memory-recurrent]')?.textContent ?? '';
      const m = /([\d,]+) earlier/.exec(more);
      const entry = {
        text: p.querySelector('[data-testid=prefill-read]')?.textContent ?? '',
        speed: p.querySelector('[data-testid=prefill-speed]')?.textContent ?? null,
        left: p.querySelector('[data-testid=prefill-left]')?.textContent ?? null,
        bar: Number(p.querySelector('[role=progressbar]')?.getAttribute('aria-valuenow')),
        meter: meter ? Number(meter.getAttribute('aria-valuenow')) + (m ? Number(m[1].replace(/,/g, '')) : 0) : null,
      };
      if (rec.at(-1)?.text !== entry.text || rec.at(-1)?.meter !== entry.meter) rec.push(entry);
    };
    new MutationObserver(read).observe(document.body, { subtree: true, childList: true, characterData: true, attributes: true });
  });
}

async function openMemoryChat(page) {
  await page.locator('[data-testid=conversation-title]', { hasText: 'Linear attention memory' }).click();
  await page.getByTestId('memory-meter').waitFor();
}

describe('a long paste', () => {
  test('shows its reading (read / total, tokens/s, time left, Stop) and the meter follows what was read', async () => {
    const { page } = await suite.open({ timing: { firstTokenMs: 60, tokenMs: 12, prefillTokensPerS: 6000 } });
    await openMemoryChat(page);
    const before = await meterTotal(page);
    assert.ok(before > 0);
    await recordReading(page);
    const paste = 'All work and no play makes a long paste. '.repeat(1000); // 41,000 characters
    const total = promptTokens(paste.length);
    await page.getByTestId('composer').fill(paste);
    await page.getByTestId('composer').press('Enter');

    const progress = page.getByTestId('prefill-progress');
    await progress.waitFor();
    assert.match(await progress.textContent(), /Reading your message/);
    assert.equal(await progress.getByTestId('prefill-stop').isEnabled(), true, 'Stop is there, in the chat');
    await lastAssistant(page).and(page.locator('[data-status=complete]')).waitFor({ timeout: 20_000 });

    const rec = await page.evaluate(() => window.__reading);
    assert.ok(rec.length >= 4, `several readings: ${JSON.stringify(rec.slice(0, 3))}`);
    let last = -1;
    for (const r of rec) {
      const [read, whole] = r.text.split('/').map(number);
      assert.equal(whole, total, r.text);
      assert.match(r.text, /^\d{1,3}(,\d{3})* \/ \d{1,3}(,\d{3})+ tokens$/, 'grouped thousands');
      assert.ok(read >= last && read < whole, `reading counts up: ${r.text}`);
      last = read;
      assert.equal(r.meter, before + read, `the meter is what was read: ${JSON.stringify(r)}`);
      assert.equal(r.bar, Math.round((read / whole) * 100));
    }
    assert.ok(rec.some((r) => r.speed && /^\d[\d,.]* tok\/s$/.test(r.speed) && /left$/.test(r.left ?? '')), 'speed and time left');
    assert.equal(await progress.count(), 0, 'the progress goes once the answer starts');
    // After the turn, the meter is the backend's.
    const backend = await backendMemory(page, 'c-memory');
    assert.equal(await meterTotal(page), backend.totalTokens);
    // The saved stats show the prompt and how fast it was read.
    const stats = lastAssistant(page).getByTestId('prompt-stats');
    assert.match(await stats.textContent(), new RegExp(`^prompt ${total.toLocaleString('en-US')}\\s+at [\\d.,]+ tok/s$`));
    clean(page);
  });

  test('the meter counts the generated tokens on top of the prompt while the answer streams', async () => {
    const { page } = await suite.open({ timing: { firstTokenMs: 60, tokenMs: 60 } });
    await mock(page, () => window.__tpttMock.setReply(Array.from({ length: 30 }, (_, i) => `w${i}`).join(' ')));
    await openMemoryChat(page);
    const before = await meterTotal(page);
    const text = 'Tell me about the memory';
    await page.getByTestId('composer').fill(text);
    await page.getByTestId('composer').press('Enter');
    const streaming = page.locator('[data-testid=message][data-status=streaming]');
    await until(page, () => /\b1\d tokens/.test(document.querySelector('[data-status=streaming] [data-testid=stats]')?.textContent ?? ''));
    const shown = await streaming.getByTestId('stats').textContent();
    const generated = Number(/(\d+) tokens/.exec(shown)[1]);
    const meter = await meterTotal(page);
    // The prompt was read (the memory event), then each generated token (±1: a token may land between the reads).
    const expected = before + promptTokens(text.length) + generated;
    assert.ok(Math.abs(meter - expected) <= 1, `meter ${meter}, expected ${expected} (${shown})`);
    await lastAssistant(page).and(page.locator('[data-status=complete]')).waitFor();
    clean(page);
  });

  test('Stop while the paste is read (twice): the answer says so, the meter stays and is the backend’s, the chat goes on', async () => {
    const { page } = await suite.open({ timing: { firstTokenMs: 60, tokenMs: 12, prefillTokensPerS: 3000 } });
    await openMemoryChat(page);
    const before = await meterTotal(page);
    await page.getByTestId('composer').fill('x'.repeat(60_000));
    await page.getByTestId('composer').press('Enter');
    const progress = page.getByTestId('prefill-progress');
    await until(page, () => /[1-9]/.test(document.querySelector('[data-testid=prefill-read]')?.textContent.split('/')[0] ?? ''));
    await progress.getByTestId('prefill-stop').click();
    await page.keyboard.press('Escape'); // a second stop: harmless
    const answer = lastAssistant(page);
    await answer.and(page.locator('[data-status=partial]')).waitFor();
    const status = await answer.getByTestId('message-status').textContent();
    const m = /Stopped before the answer began — the model had read ([\d,]+) tokens of the message/.exec(status);
    assert.ok(m, status);
    const read = number(m[1]);
    assert.ok(read > 0 && read < promptTokens(60_000), status);
    await page.getByTestId('memory-meter').waitFor();
    assert.equal(await meterTotal(page), before + read, 'the meter shows what was read');
    assert.equal((await backendMemory(page, 'c-memory')).totalTokens, before + read, 'as the backend says');
    assert.equal(await page.getByTestId('stop').count(), 0, 'nothing runs any more');
    // The conversation goes on.
    await page.getByTestId('composer').fill('Still there?');
    await page.getByTestId('composer').press('Enter');
    await answer.and(page.locator('[data-status=complete]')).waitFor();
    assert.ok((await meterTotal(page)) > before + read);
    clean(page);
  });

  test('a Stop the backend confirms late: the meter stays at what was read, the late end still counts', async () => {
    const { page } = await suite.open({ timing: { firstTokenMs: 60, tokenMs: 12, prefillTokensPerS: 3000, stopMs: 6500 } });
    await openMemoryChat(page);
    const before = await meterTotal(page);
    await recordReading(page);
    await page.getByTestId('composer').fill('x'.repeat(60_000));
    await page.getByTestId('composer').press('Enter');
    await until(page, () => /[1-9]/.test(document.querySelector('[data-testid=prefill-read]')?.textContent.split('/')[0] ?? ''));
    await page.getByTestId('prefill-stop').click();
    const answer = lastAssistant(page);
    // After 5 s without the backend's word, the UI ends the stream itself...
    await answer.and(page.locator('[data-status=partial]')).waitFor({ timeout: 8000 });
    // What the reading had reached (the mock reads no further once stopped).
    const read = number((await page.evaluate(() => window.__reading.at(-1).text)).split('/')[0]);
    assert.ok(read > 0);
    assert.equal(await meterTotal(page), before + read, 'the meter still shows what was read');
    assert.match(await answer.getByTestId('message-status').textContent(), /^Stopped before the answer began\.$/);
    // ...and the backend's late `stopped` brings the stats.
    await answer.getByTestId('message-status').filter({ hasText: `had read ${read.toLocaleString('en-US')} tokens` }).waitFor({ timeout: 5000 });
    assert.equal(await meterTotal(page), before + read);
    clean(page);
  });

  test('TTFT means the same live and saved, the model load is shown apart, long waits in minutes', async () => {
    const { page } = await suite.open({ timing: { firstTokenMs: 700, tokenMs: 40, prefillTokensPerS: 8000 } });
    await page.getByTestId('composer').fill('y'.repeat(24_000)); // 6,004 tokens, ~0.75 s to read
    await page.getByTestId('composer').press('Enter');
    await page.locator('[data-testid=message][data-status=streaming] [data-testid=ttft]').waitFor({ timeout: 20_000 });
    const liveLine = await page.locator('[data-testid=message][data-status=streaming] [data-testid=stats]').textContent();
    const answer = lastAssistant(page);
    await answer.and(page.locator('[data-status=complete]')).waitFor();
    const ms = (t) => {
      const m = /TTFT ([\d.]+) (ms|s)/.exec(t);
      return Number(m[1]) * (m[2] === 's' ? 1000 : 1);
    };
    const live = ms(liveLine);
    const saved = ms(await answer.getByTestId('ttft').textContent());
    assert.ok(Math.abs(live - saved) <= 150, `live ${live} ms vs saved ${saved} ms`);
    assert.ok(saved >= 600 && saved < 1500, `the reading (~750 ms), not the load (700 ms): ${saved}`);
    // The first turn loaded the model: shown apart, live and saved.
    assert.match(liveLine, /model load 700 ms/);
    assert.equal(await answer.getByTestId('load-time').textContent(), 'model load 700 ms');
    // The next turn finds it loaded: no load figure.
    await page.getByTestId('composer').fill('Short one');
    await page.getByTestId('composer').press('Enter');
    await page.locator('[data-testid=message][data-role=assistant]').nth(1).and(page.locator('[data-status=complete]')).waitFor();
    assert.equal(await lastAssistant(page).getByTestId('load-time').count(), 0);

    // A wait of minutes reads in minutes.
    await mock(page, () => {
      const m = window.__tpttMock.state.conversations.find((c) => c.id === 'c-memory').messages.findLast((x) => x.role === 'assistant');
      m.stats = { ...m.stats, ttftMs: 398_770, promptTokens: 16_266, prefillTokensPerS: 40.9 };
    });
    await page.locator('[data-testid=conversation-title]', { hasText: 'Linear attention memory' }).click();
    const stats = lastAssistant(page).getByTestId('stats');
    await stats.waitFor();
    const line = await stats.textContent();
    assert.match(line, /TTFT 6 min 39 s/);
    assert.match(line, /prompt 16,266\s+at 40\.9 tok\/s/);
    clean(page);
  });

  test('the composer grows to show a paste over 20,000 characters', async () => {
    const { page } = await suite.open();
    const box = page.getByTestId('composer');
    await box.fill('one line');
    const small = (await box.boundingBox()).height;
    await box.fill('z'.repeat(25_000));
    await until(page, () => document.querySelector('[data-testid=composer]').classList.contains('tall'));
    const tall = (await box.boundingBox()).height;
    assert.ok(tall > 4 * small && tall >= 0.39 * 860, `the box is ${tall}px high after the paste (one line: ${small}px)`);
    // Back to a short text, it shrinks again.
    await box.fill('short');
    await until(page, (h) => document.querySelector('[data-testid=composer]').getBoundingClientRect().height < h, tall / 2);
    clean(page);
  });

  test('numbers are grouped by thousands even when the webview has no locale', async () => {
    // A webview without a locale (LANG=C) formats with a POSIX locale that does not group.
    const init = () => {
      const Original = Intl.NumberFormat;
      Intl.NumberFormat = function (locale, options) {
        return new Original(locale ?? 'en-US', locale ? options : { ...options, useGrouping: false });
      };
      Intl.NumberFormat.prototype = Original.prototype;
    };
    const { page } = await suite.open({ init });
    assert.equal(await page.evaluate(() => new Intl.NumberFormat().format(16266)), '16266', 'the stand-in groups nothing');
    await openMemoryChat(page);
    const value = await page.locator('.memory-value').textContent();
    assert.match(value, /^[\d,]+ \/ 512$/);
    await page.getByTestId('composer').fill('q'.repeat(12_000));
    const hint = await page.locator('.composer-hint').textContent();
    assert.match(hint, /12,000 characters/);
    clean(page);
  });

  test('a paste while an answer streams waits in the box; a paste of megabytes is sent whole', async () => {
    const { page } = await suite.open({ timing: { firstTokenMs: 60, tokenMs: 80 } });
    await page.getByTestId('composer').fill('First question');
    await page.getByTestId('composer').press('Enter');
    await page.locator('[data-testid=message][data-status=streaming]').waitFor();
    const big = 'A paste of several megabytes. '.repeat(110_000); // 3.3 MB
    await page.getByTestId('composer').fill(big);
    await page.getByTestId('composer').press('Enter'); // Enter does not send while generating
    assert.equal(await page.locator('[data-testid=message][data-role=user]').count(), 1);
    await lastAssistant(page).and(page.locator('[data-status=complete]')).waitFor();
    assert.equal((await page.getByTestId('composer').inputValue()).length, big.length, 'the paste waited in the box');
    await page.getByTestId('send').click();
    await page.locator('[data-testid=message][data-role=assistant]').nth(1).and(page.locator('[data-status=complete]')).waitFor({ timeout: 20_000 });
    const sent = await mock(page, () => {
      const c = window.__tpttMock.state.conversations.at(-1);
      return c.messages.filter((m) => m.role === 'user').map((m) => m.content.length);
    });
    assert.deepEqual(sent, ['First question'.length, big.length]);
    assert.equal(await page.getByTestId('composer').inputValue(), '', 'the draft went once sent');
    clean(page);
  });
});
