/* TS Pro Relay admin pages: every bit of behaviour lives here (the CSP forbids inline script).
 * Pages work without it, except Copy and the automatic refreshes.
 *   [data-copy="ID"]    copy the value of element ID to the clipboard
 *   form[data-confirm]  ask before submitting; sets its "confirmed" field to "yes"
 *                       (a submit button's own data-confirm asks instead, for that button only)
 *   [data-select-all="FORM"]  a checkbox that ticks or clears every "ids" checkbox of form FORM
 *   [data-poll="URL"]   fetch URL (JSON) every 2 s and fill [data-poll-field] children until "final"
 *   [data-refresh="N"]  every N seconds, reload this element (by id) from the current page
 */
(function () {
  "use strict";

  function say(button, text) {
    var original = button.getAttribute("data-label") || button.innerHTML;
    button.setAttribute("data-label", original);
    button.textContent = text;
    window.setTimeout(function () { button.innerHTML = original; }, 2000);
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest("[data-copy]");
    if (!button) { return; }
    var source = document.getElementById(button.getAttribute("data-copy"));
    var text = source ? (source.value || source.textContent || "").trim() : "";
    if (!navigator.clipboard || !text) {
      if (source && source.select) { source.select(); }
      say(button, "Press Ctrl+C to copy");
      return;
    }
    navigator.clipboard.writeText(text).then(
      function () { say(button, "Copied"); },
      function () { if (source.select) { source.select(); } say(button, "Press Ctrl+C to copy"); }
    );
  });

  document.addEventListener("submit", function (event) {
    var form = event.target;
    var submitter = event.submitter;
    var question = (submitter && submitter.getAttribute("data-confirm")) || form.getAttribute("data-confirm");
    if (!question) { return; }
    if (!window.confirm(question)) {
      event.preventDefault();
      return;
    }
    var field = form.querySelector("input[name=confirmed]");
    if (field) { field.value = "yes"; }
  });

  document.addEventListener("change", function (event) {
    var box = event.target;
    var formId = box.getAttribute && box.getAttribute("data-select-all");
    if (!formId) { return; }
    var form = document.getElementById(formId);
    if (!form) { return; }
    Array.prototype.forEach.call(form.querySelectorAll("input[type=checkbox][name=ids]"), function (item) {
      item.checked = box.checked;
    });
  });

  function poll(element) {
    if (element.getAttribute("data-final")) { return; }
    var url = element.getAttribute("data-poll");
    window.setTimeout(function () {
      fetch(url, { headers: { "Accept": "application/json", "X-Auto-Refresh": "1" }, credentials: "same-origin" })
        .then(function (response) { return response.ok ? response.json() : null; })
        .then(function (data) {
          if (!data) { return; }
          var badge = element.querySelector("[data-poll-field=badge]");
          var detail = element.querySelector("[data-poll-field=detail]");
          if (badge) { badge.innerHTML = data.badge; }
          if (detail) { detail.textContent = data.detail; }
          if (data.final) { element.setAttribute("data-final", "1"); } else { poll(element); }
        })
        .catch(function () { poll(element); });
    }, 2000);
  }

  function busy(region) {
    var active = document.activeElement;
    return (active && region.contains(active) && /^(INPUT|SELECT|TEXTAREA)$/.test(active.tagName)) ||
      region.querySelector("input[type=checkbox]:checked") !== null;
  }

  function refresh(region) {
    var seconds = parseInt(region.getAttribute("data-refresh"), 10) || 5;
    window.setTimeout(function () {
      if (document.hidden || busy(region)) { refresh(region); return; }
      fetch(window.location.href, { headers: { "X-Auto-Refresh": "1" }, credentials: "same-origin" })
        .then(function (response) { return response.text().then(function (text) { return [response, text]; }); })
        .then(function (pair) {
          var fresh = new DOMParser().parseFromString(pair[1], "text/html").getElementById(region.id);
          if (!fresh) { window.location.reload(); return; } /* signed out, or the page changed */
          region.replaceWith(fresh);
          refresh(fresh);
        })
        .catch(function () { refresh(region); });
    }, seconds * 1000);
  }

  function start() {
    Array.prototype.forEach.call(document.querySelectorAll("[data-poll]"), poll);
    Array.prototype.forEach.call(document.querySelectorAll("[data-refresh][id]"), refresh);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
}());
