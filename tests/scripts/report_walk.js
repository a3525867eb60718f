// Walks a Snakemake HTML report as a reader would: each category of the menu, each
// result in it: the eye button (what is shown), the info button (caption, labels).
// Writes what it saw as JSON into a pre element (id scalelab-walk) for --dump-dom to return.
(async function () {
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const text = (el) => (el ? el.innerText || el.textContent || "" : "");
  const menu = () => [...document.querySelectorAll("nav a")];
  const seen = { landing: "", categories: {} };
  await sleep(1000);
  seen.landing = text(document.body);
  const names = menu().map((a) => a.textContent.trim())
    .filter((t) => Object.prototype.hasOwnProperty.call(categories, t));
  for (const name of names) {
    app.showCategory(name);  // what the menu link calls
    await sleep(500);
    const items = [];
    const count = document.querySelectorAll("nav table tbody tr").length;
    for (let i = 0; i < count; i++) {
      app.showCategory(name);
      await sleep(300);
      const row = document.querySelectorAll("nav table tbody tr")[i];
      const cells = [...row.querySelectorAll("td")];
      const buttons = cells[cells.length - 1].querySelectorAll("a");
      const item = { labels: cells.slice(0, -1).map((c) => c.textContent.trim()) };
      const href = buttons[0].getAttribute("href");
      if (href && href.startsWith("data:")) {
        // shown as a download link only; a small table whole, so its content can be read
        item.download = href.length < 16384 ? href : href.slice(0, 64);
      } else {
        buttons[0].click();
        await sleep(300);
        const img = document.querySelector("main img, div.p-3 > img");
        const frame = document.querySelector("iframe");
        item.img = img ? img.getAttribute("src") : null;
        item.frame = frame ? frame.getAttribute("src") : null;
      }
      buttons[1].click();
      await sleep(300);
      item.info = text(document.querySelector("nav"));
      items.push(item);
    }
    seen.categories[name] = items;
  }
  const pre = document.createElement("pre");
  pre.id = "scalelab-walk";
  pre.textContent = JSON.stringify(seen);
  document.body.appendChild(pre);
})();
