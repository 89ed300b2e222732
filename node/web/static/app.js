// Asks before sending a form marked data-confirm="question" (a delete, say): inline handlers are
// refused by the node's Content Security Policy, so this is how a page asks.
document.addEventListener("submit", (event) => {
  const question = event.target.dataset ? event.target.dataset.confirm : undefined;
  if (question && !window.confirm(question)) {
    event.preventDefault();
  }
});
