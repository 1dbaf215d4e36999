// Typeset the maths of every page (pymdownx.arithmatex, generic mode) with KaTeX,
// shipped with the site so that it renders offline too. Material's instant
// navigation swaps pages without a reload: document$ fires on each page.
document$.subscribe(({ body }) => {
  renderMathInElement(body, {
    delimiters: [
      { left: "$$", right: "$$", display: true },
      { left: "$", right: "$", display: false },
      { left: "\\(", right: "\\)", display: false },
      { left: "\\[", right: "\\]", display: true },
    ],
  });
});
