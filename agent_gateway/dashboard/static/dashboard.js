// agent_gateway dashboard: copy buttons, and keeping a shown-once secret out of reloads.
(function () {
  "use strict";

  // A page that shows a new key was the answer to a POST; point this history entry at the list,
  // so a reload (or Back) fetches the list again instead of showing or re-posting the key.
  var replaceUrl = document.body.getAttribute("data-replace-url");
  if (replaceUrl && window.history && window.history.replaceState) {
    window.history.replaceState(null, "", replaceUrl);
  }

  function selectText(element) {
    var range = document.createRange();
    range.selectNodeContents(element);
    var selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
  }

  function fallbackCopy(element) {
    selectText(element);
    try {
      return document.execCommand("copy");
    } catch (err) {
      return false;
    }
  }

  function done(button, ok) {
    button.textContent = ok ? "Copied" : "Press Ctrl+C";
    button.classList.toggle("copied", ok);
    window.setTimeout(function () {
      button.textContent = "Copy";
      button.classList.remove("copied");
    }, 4000);
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest("[data-copy-target]");
    if (!button) {
      return;
    }
    var element = document.getElementById(button.getAttribute("data-copy-target"));
    if (!element) {
      return;
    }
    var text = element.textContent.trim();
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(
        function () { done(button, true); },
        function () { done(button, fallbackCopy(element)); }
      );
    } else {
      done(button, fallbackCopy(element));
    }
  });
})();
