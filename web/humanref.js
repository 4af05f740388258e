// HumanRef's frontend extension: a HumanRef warning (a mask stretched, a hand left out, an input ignored)
// arrives in the node's UI output under "humanref_warnings"; show it in a toast naming the node, since the
// text under the node is easy to miss when the node is off screen.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

app.registerExtension({
  name: "HumanRef.Warnings",
  setup() {
    api.addEventListener("executed", ({ detail }) => {
      const warnings = detail?.output?.humanref_warnings;
      if (!Array.isArray(warnings) || warnings.length === 0) return;
      const node = app.graph?.getNodeById?.(Number(detail.node)) ?? app.graph?.getNodeById?.(detail.node);
      const title = node?.title ?? `node ${detail.node}`;
      app.extensionManager?.toast?.add({
        severity: "warn",
        summary: `HumanRef: ${title}`,
        detail: warnings.join("\n"),
        life: 20000,
      });
    });
  },
});
