// MathJax 3 set-up for pymdownx.arithmatex (generic mode): typeset only the formulas it marked.
// The renderer itself is served by this site (assets/mathjax/, copied by docs/hooks/mathjax_assets.py).
window.MathJax = {
  tex: {
    inline: [["\\(", "\\)"]],
    display: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
};
