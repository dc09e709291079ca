// Model output is untrusted. It becomes HTML here in two independent layers:
//   1. marked renders markdown with raw HTML *escaped as text* (a model that writes
//      `<img onerror=…>` shows those characters), links kept only for http(s)/mailto, and
//      images shown as text (an offline app must not fetch remote pixels);
//   2. DOMPurify then keeps only an allowlist of tags and attributes, whatever layer 1 let by.
// The result is the only HTML the UI ever injects ({@html} in Markdown.svelte).

import DOMPurify from 'dompurify';
import { Marked, type Tokens } from 'marked';
import hljs from 'highlight.js/lib/core';
import bash from 'highlight.js/lib/languages/bash';
import c from 'highlight.js/lib/languages/c';
import cpp from 'highlight.js/lib/languages/cpp';
import css from 'highlight.js/lib/languages/css';
import go from 'highlight.js/lib/languages/go';
import javascript from 'highlight.js/lib/languages/javascript';
import json from 'highlight.js/lib/languages/json';
import python from 'highlight.js/lib/languages/python';
import rust from 'highlight.js/lib/languages/rust';
import sql from 'highlight.js/lib/languages/sql';
import typescript from 'highlight.js/lib/languages/typescript';
import xml from 'highlight.js/lib/languages/xml';
import yaml from 'highlight.js/lib/languages/yaml';

const LANGUAGES = { bash, c, cpp, css, go, javascript, json, python, rust, sql, typescript, xml, yaml };
for (const [name, lang] of Object.entries(LANGUAGES)) hljs.registerLanguage(name, lang);
hljs.registerAliases(['sh', 'shell', 'zsh'], { languageName: 'bash' });
hljs.registerAliases(['js', 'jsx', 'mjs'], { languageName: 'javascript' });
hljs.registerAliases(['ts', 'tsx'], { languageName: 'typescript' });
hljs.registerAliases(['py'], { languageName: 'python' });
hljs.registerAliases(['rs'], { languageName: 'rust' });
hljs.registerAliases(['html', 'svg'], { languageName: 'xml' });
hljs.registerAliases(['yml'], { languageName: 'yaml' });
hljs.registerAliases(['c++', 'hpp', 'cc'], { languageName: 'cpp' });

const SAFE_URL = /^(?:https?:|mailto:)/i;
/**
 * DOMPurify checks every attribute value that is not a known-safe one against this (so plain
 * values such as `type="checkbox"` or `align="left"` must pass): any value without a scheme, or
 * with http(s)/mailto. `javascript:`, `data:` and every other scheme fail.
 */
const ALLOWED_URI = /^(?:(?:https?|mailto):|[^a-z]|[a-z+.-]+(?:[^a-z+.\-:]|$))/i;

export function escapeHtml(text: string): string {
  return text
    .replace(/&/g, '&amp;')
    .replace(/</g, '&lt;')
    .replace(/>/g, '&gt;')
    .replace(/"/g, '&quot;')
    .replace(/'/g, '&#39;');
}

function codeBlock(text: string, lang: string | undefined, highlight: boolean): string {
  const name = (lang ?? '').trim().split(/\s+/)[0].toLowerCase();
  const known = name && hljs.getLanguage(name) ? name : '';
  const body =
    highlight && known
      ? hljs.highlight(text, { language: known, ignoreIllegals: true }).value
      : escapeHtml(text);
  const label = name ? `<span class="code-lang">${escapeHtml(name)}</span>` : '';
  return `<pre class="code-block">${label}<code class="hljs${known ? ` language-${known}` : ''}">${body}</code></pre>\n`;
}

function makeRenderer(highlight: boolean): Marked {
  return new Marked({
    gfm: true,
    breaks: false,
    async: false,
    renderer: {
      html(token: Tokens.HTML | Tokens.Tag) {
        return escapeHtml(token.text);
      },
      code(token: Tokens.Code) {
        return codeBlock(token.text, token.lang, highlight);
      },
      link(token: Tokens.Link) {
        const text = this.parser.parseInline(token.tokens);
        if (!SAFE_URL.test(token.href.trim())) return text;
        const title = token.title ? ` title="${escapeHtml(token.title)}"` : '';
        return `<a href="${escapeHtml(token.href.trim())}"${title}>${text}</a>`;
      },
      image(token: Tokens.Image) {
        const alt = token.text || 'image';
        return `<span class="md-image" title="${escapeHtml(token.href)}">[${escapeHtml(alt)}]</span>`;
      },
    },
  });
}

const full = makeRenderer(true);
const quick = makeRenderer(false);

const ALLOWED_TAGS = [
  'a', 'b', 'blockquote', 'br', 'code', 'del', 'em', 'h1', 'h2', 'h3', 'h4', 'h5', 'h6', 'hr',
  'i', 'li', 'ol', 'p', 'pre', 's', 'span', 'strong', 'sub', 'sup', 'table', 'tbody', 'td',
  'th', 'thead', 'tr', 'ul', 'input',
];
const ALLOWED_ATTR = ['href', 'title', 'class', 'start', 'align', 'type', 'checked', 'disabled'];

let hooked = false;
function purifier() {
  if (!hooked) {
    hooked = true;
    DOMPurify.addHook('afterSanitizeAttributes', (node) => {
      if (node.nodeName === 'A') {
        const href = node.getAttribute('href') ?? '';
        if (!SAFE_URL.test(href)) node.removeAttribute('href');
        node.setAttribute('rel', 'noopener noreferrer nofollow');
      }
      // GFM task-list checkboxes are the only inputs allowed, and they are inert.
      if (node.nodeName === 'INPUT') {
        if (node.getAttribute('type') !== 'checkbox') node.remove();
        else node.setAttribute('disabled', '');
      }
    });
  }
  return DOMPurify;
}

/**
 * Markdown → sanitized HTML. `streaming` skips code highlighting (it runs once the answer is
 * complete), which keeps re-rendering a growing answer cheap.
 */
export function renderMarkdown(source: string, streaming = false): string {
  const html = (streaming ? quick : full).parse(source) as string;
  return purifier().sanitize(html, {
    ALLOWED_TAGS,
    ALLOWED_ATTR,
    ALLOWED_URI_REGEXP: ALLOWED_URI,
    ALLOW_DATA_ATTR: false,
    ALLOW_ARIA_ATTR: false,
  });
}
