/* A small markdown renderer for model output (the chat page's only HTML source).
 *
 * Safety: the whole text is HTML-escaped before any markdown is read, so nothing the model writes
 * can become markup; the renderer only wraps escaped text in the tags below, and a link is made
 * only from an http(s) URL. Blocks: fenced code (an unclosed fence runs to the end, as while
 * streaming), headings, lists (nested by indent), block quotes, tables, rules, paragraphs.
 * Inline: `code`, [links](https://...), **bold**, *italic*, ~~strike~~.
 */
(function (global) {
  "use strict";

  const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  function escapeHtml(text) {
    return String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);
  }

  // ----------------------------------------------------------------------------------- inline
  const SLOT = /\u0000(\d+)\u0000/g;

  function inline(text) {  // text is already escaped
    const slots = [];
    const keep = (html) => "\u0000" + (slots.push(html) - 1) + "\u0000";
    text = text.replace(/`([^`\n]+)`/g, (_, code) => keep("<code>" + code + "</code>"));
    text = text.replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s()]+)\)/g, (_, label, url) =>
      keep('<a href="' + url + '" target="_blank" rel="noopener noreferrer">') + label + keep("</a>"));
    text = text.replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, "<strong>$1</strong>");
    text = text.replace(/(^|[^\w])__(?=\S)([\s\S]*?\S)__(?!\w)/g, "$1<strong>$2</strong>");
    text = text.replace(/(^|[^*\w])\*(?=[^\s*])([^*\n]*?[^\s*])\*(?!\*)/g, "$1<em>$2</em>");
    text = text.replace(/(^|[^\w])_(?=[^\s_])([^_\n]*?[^\s_])_(?!\w)/g, "$1<em>$2</em>");
    text = text.replace(/~~(?=\S)([^~\n]*?\S)~~/g, "<del>$1</del>");
    return text.replace(SLOT, (_, i) => slots[Number(i)]);
  }

  function lines(text) {  // inline markup, keeping the text's line breaks
    return inline(text).replace(/\n/g, "<br>");
  }

  // ----------------------------------------------------------------------------------- blocks
  const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
  const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
  const QUOTE = /^ {0,3}&gt;\s?(.*)$/;
  const ITEM = /^(\s*)(?:([-*+])|(\d{1,9})[.)])\s+(.*)$/;
  const TABLE_RULE = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;

  function isBlockStart(line, next) {
    return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) ||
      ITEM.test(line) || (line.includes("|") && next !== undefined && TABLE_RULE.test(next) &&
                          next.includes("-"));
  }

  function cells(row) {
    return row.trim().replace(/^\|/, "").replace(/\|$/, "").split("|").map((c) => c.trim());
  }

  function table(rows) {
    const head = cells(rows[0]);
    let html = "<table><thead><tr>" + head.map((c) => "<th>" + inline(c) + "</th>").join("") +
      "</tr></thead><tbody>";
    for (const row of rows.slice(2)) {
      const cs = cells(row);
      html += "<tr>" + head.map((_, i) => "<td>" + inline(cs[i] || "") + "</td>").join("") + "</tr>";
    }
    return html + "</tbody></table>";
  }

  function list(items) {
    let html = "";
    const stack = [];  // open lists: {indent, type}
    const open = (it) => (it.type === "ol" && it.start !== 1 ? '<ol start="' + it.start + '">'
                                                            : "<" + it.type + ">");
    for (const it of items) {
      let top = stack[stack.length - 1];
      while (top && it.indent < top.indent && stack.length > 1) {
        html += "</li></" + stack.pop().type + ">";
        top = stack[stack.length - 1];
      }
      if (!top || it.indent > top.indent) {  // the first list, or one nested in the open item
        html += open(it);
        stack.push({ indent: it.indent, type: it.type });
      } else if (it.type !== top.type) {  // same level, other kind: a new list
        html += "</li></" + top.type + ">" + open(it);
        stack[stack.length - 1] = { indent: it.indent, type: it.type };
      } else {
        html += "</li>";
      }
      html += "<li>" + lines(it.text);
    }
    while (stack.length) html += "</li></" + stack.pop().type + ">";
    return html;
  }

  function blocks(src) {  // src: escaped lines
    const out = [];
    let i = 0;
    while (i < src.length) {
      const line = src[i];
      let m;
      if (!line.trim()) { i++; continue; }
      if ((m = FENCE.exec(line))) {
        const mark = m[1], body = [];
        const close = new RegExp("^ {0,3}" + (mark[0] === "`" ? "`" : "~") + "{" + mark.length + ",}\\s*$");
        for (i++; i < src.length && !close.test(src[i]); i++) body.push(src[i]);
        i++;  // the closing fence (or past the end)
        const lang = m[2] ? ' class="language-' + m[2] + '" data-lang="' + m[2] + '"' : "";
        out.push("<pre><code" + lang + ">" + body.join("\n") + "</code></pre>");
      } else if ((m = HEADING.exec(line))) {
        const n = m[1].length;
        out.push("<h" + n + ">" + inline(m[2]) + "</h" + n + ">");
        i++;
      } else if (RULE.test(line)) {
        out.push("<hr>");
        i++;
      } else if (QUOTE.test(line)) {
        const inner = [];
        for (; i < src.length && (m = QUOTE.exec(src[i])); i++) inner.push(m[1]);
        out.push("<blockquote>" + blocks(inner) + "</blockquote>");
      } else if (ITEM.test(line)) {
        const items = [];
        while (i < src.length) {
          if ((m = ITEM.exec(src[i]))) {
            items.push({ indent: m[1].length, type: m[2] ? "ul" : "ol",
                         start: m[3] ? Number(m[3]) : 1, text: m[4] });
            i++;
          } else if (src[i].trim() && /^\s{2,}/.test(src[i])) {  // an item's continuation line
            items[items.length - 1].text += "\n" + src[i].trim();
            i++;
          } else if (!src[i].trim()) {  // a blank line: the list goes on if an item follows
            let j = i;
            while (j < src.length && !src[j].trim()) j++;
            if (j < src.length && ITEM.test(src[j])) i = j; else break;
          } else {
            break;
          }
        }
        out.push(list(items));
      } else if (line.includes("|") && i + 1 < src.length && TABLE_RULE.test(src[i + 1]) &&
                 src[i + 1].includes("-")) {
        const rows = [line, src[i + 1]];
        for (i += 2; i < src.length && src[i].includes("|") && src[i].trim(); i++) rows.push(src[i]);
        out.push(table(rows));
      } else {
        const para = [line];
        for (i++; i < src.length && src[i].trim() && !isBlockStart(src[i], src[i + 1]); i++) {
          para.push(src[i]);
        }
        out.push("<p>" + lines(para.join("\n")) + "</p>");
      }
    }
    return out.join("\n");
  }

  /** Markdown text -> HTML that contains no markup from the text itself. */
  function render(text) {
    const clean = String(text == null ? "" : text).replace(/\u0000/g, "").replace(/\r\n?/g, "\n");
    return blocks(escapeHtml(clean).split("\n"));
  }

  global.PagodaMarkdown = { render, escapeHtml };
})(window);
