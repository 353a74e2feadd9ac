// The TinyMQ console. Plain JavaScript, no build step, no outside network.
//
// Live data comes over TinyMQ's own Server-Sent Events:
// - console/events sends a "stats" event once a second: the server's
//   counters and its most active topics;
// - the live tail is an ordinary subscription, api/sse?topic=<pattern>,
//   whose messages arrive as JSON envelopes {type, topic, id, data}.
// Publishing is an ordinary POST to api/topics/<topic>.
"use strict";

(() => {
  const TAIL_LIMIT = 200;
  const TOPIC_PART = /^[A-Za-z0-9_-]+$/;
  const numbers = new Intl.NumberFormat("en");

  const $ = (id) => document.getElementById(id);
  let feed = null;
  let tail = null;
  let tailPattern = "";
  let previous = null;
  const lastCounts = new Map();

  // Helpers

  function token() {
    return $("token").value.trim();
  }

  function withToken(url) {
    const value = token();
    if (!value) return url;
    return url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(value);
  }

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function bytes(count) {
    if (count < 1024) return numbers.format(count) + " B";
    if (count < 1024 * 1024) return (count / 1024).toFixed(1) + " KiB";
    return (count / 1024 / 1024).toFixed(1) + " MiB";
  }

  function duration(seconds) {
    const s = Math.max(0, Math.floor(seconds));
    const d = Math.floor(s / 86400);
    const h = Math.floor((s % 86400) / 3600);
    const m = Math.floor((s % 3600) / 60);
    if (d) return `${d}d ${h}h`;
    if (h) return `${h}h ${m}m`;
    return `${m}m ${s % 60}s`;
  }

  function rate(value) {
    return value >= 100 ? numbers.format(Math.round(value)) : value.toFixed(1);
  }

  // A pattern as the server accepts it: dot-separated segments of
  // letters, digits, "_" and "-", or "*"; a last segment may be ">".
  function validPattern(pattern) {
    if (!pattern || pattern.length > 255) return false;
    const parts = pattern.split(".");
    return parts.every(
      (part, index) =>
        TOPIC_PART.test(part) || part === "*" || (part === ">" && index === parts.length - 1),
    );
  }

  // The server's figures

  function setFeedStatus(text, state) {
    const badge = $("feed-status");
    badge.textContent = text;
    badge.className = "badge " + state;
    document.body.dataset.feed = state;
  }

  function openFeed() {
    if (feed) feed.close();
    feed = new EventSource(withToken("console/events"));
    feed.addEventListener("open", () => setFeedStatus("live", "live"));
    feed.addEventListener("stats", (event) => render(JSON.parse(event.data)));
    feed.addEventListener("error", () => {
      const closed = feed.readyState === EventSource.CLOSED;
      setFeedStatus(closed ? "offline" : "reconnecting", "down");
    });
  }

  function render(stats) {
    const server = stats.server;
    $("version").textContent = "v" + stats.version;
    const counters = {
      published: numbers.format(server.published),
      delivered: numbers.format(server.delivered),
      "connections-sse": numbers.format(server.connections_sse),
      "connections-ws": numbers.format(server.connections_ws),
      subscriptions: numbers.format(server.subscriptions),
      topics: numbers.format(server.topics),
      skipped: numbers.format(server.skipped),
      dropped: numbers.format(server.dropped),
      paused: numbers.format(server.paused),
      backlog: bytes(server.backlog_bytes),
      history: `${numbers.format(server.history_messages)} · ${bytes(server.history_bytes)}`,
      uptime: duration(stats.time - stats.started),
    };
    if (previous && stats.time > previous.time) {
      const seconds = stats.time - previous.time;
      counters["rate-in"] = rate((server.published - previous.server.published) / seconds);
      counters["rate-out"] = rate((server.delivered - previous.server.delivered) / seconds);
    }
    for (const [name, text] of Object.entries(counters)) {
      $("c-" + name).textContent = text;
    }
    renderTopics(stats.topics, server.topics);
    previous = stats;
  }

  function renderTopics(topics, total) {
    const body = $("topics").tBodies[0];
    const rows = topics.map((topic) => {
      const row = element("tr");
      row.dataset.topic = topic.topic;
      if (lastCounts.has(topic.topic) && lastCounts.get(topic.topic) !== topic.messages) {
        row.className = "fresh";
      }
      lastCounts.set(topic.topic, topic.messages);
      row.append(
        element("td", "topic", topic.topic),
        element("td", "num", numbers.format(topic.subscribers)),
        element("td", "num", numbers.format(topic.messages)),
        element("td", "num", rate(topic.rate)),
        element("td", "num", numbers.format(topic.history)),
      );
      const action = element("td", "num");
      const follow = element("button", "link", "tail");
      follow.type = "button";
      follow.addEventListener("click", () => followTopic(topic.topic));
      action.append(follow);
      row.append(action);
      return row;
    });
    body.replaceChildren(...rows);
    $("topics-empty").hidden = topics.length > 0;
    const more = $("topics-more");
    more.hidden = total <= topics.length;
    more.textContent = `The ${topics.length} most active of ${numbers.format(total)} topics.`;
  }

  // The live tail

  function setTailStatus(text) {
    $("tail-status").textContent = text;
  }

  function addTailLine(parts, className) {
    const list = $("tail");
    const item = element("li", className);
    const when = new Date().toLocaleTimeString([], { hour12: false });
    item.append(element("span", "meta", when));
    for (const [cls, text] of parts) item.append(element("span", cls, text));
    list.prepend(item);
    while (list.children.length > TAIL_LIMIT) list.lastElementChild.remove();
  }

  function showMessage(envelope) {
    const data =
      typeof envelope.data === "string" ? envelope.data : JSON.stringify(envelope.data);
    addTailLine([
      ["topic", envelope.topic],
      ["meta", "#" + envelope.id],
      ["data", data],
    ]);
  }

  function followTopic(pattern) {
    $("tail-pattern").value = pattern;
    startTail(pattern);
  }

  function startTail(pattern) {
    stopTail();
    if (!validPattern(pattern)) {
      setTailStatus(`"${pattern}" is not a topic or pattern.`);
      return;
    }
    tailPattern = pattern;
    $("tail").replaceChildren();
    const url = "api/sse?topic=" + encodeURIComponent(pattern) + "&last=10";
    tail = new EventSource(withToken(url));
    setTailStatus(`Connecting to ${pattern}…`);
    tail.addEventListener("open", () => {
      setTailStatus(`Following ${pattern}, newest first.`);
      document.body.dataset.tail = pattern;
    });
    tail.addEventListener("message", (event) => showMessage(JSON.parse(event.data)));
    tail.addEventListener("reset", () =>
      addTailLine([["event", "history gap: some messages were missed"]]),
    );
    tail.addEventListener("skipped", (event) =>
      addTailLine([["event", `skipped ${JSON.parse(event.data).skipped} messages`]]),
    );
    tail.addEventListener("error", (event) => {
      if (event.data) {
        const error = JSON.parse(event.data);
        setTailStatus(`The server ended the stream: ${error.message}`);
      } else if (tail && tail.readyState === EventSource.CLOSED) {
        setTailStatus(`The server refused to stream ${pattern}.`);
      } else {
        setTailStatus(`Reconnecting to ${pattern}…`);
      }
    });
    $("tail-stop").disabled = false;
  }

  function stopTail() {
    if (tail) tail.close();
    tail = null;
    delete document.body.dataset.tail;
    $("tail-stop").disabled = true;
    if (tailPattern) setTailStatus(`Stopped following ${tailPattern}.`);
    tailPattern = "";
  }

  // Publishing

  async function publish(topic, body, json) {
    const result = $("publish-result");
    result.className = "muted";
    result.textContent = "Publishing…";
    const headers = {
      "Content-Type": json ? "application/json" : "text/plain; charset=utf-8",
    };
    if (token()) headers.Authorization = "Bearer " + token();
    try {
      const response = await fetch("api/topics/" + encodeURIComponent(topic), {
        method: "POST",
        headers,
        body,
      });
      const answer = await response.json();
      if (response.ok) {
        result.className = "ok";
        result.textContent = `Published message ${answer.id} to ${answer.topic}.`;
      } else {
        result.className = "error";
        result.textContent = `${response.status}: ${answer.message}`;
      }
    } catch (error) {
      result.className = "error";
      result.textContent = "The server did not answer: " + error.message;
    }
  }

  // Wiring

  $("tail-form").addEventListener("submit", (event) => {
    event.preventDefault();
    startTail($("tail-pattern").value.trim());
  });
  $("tail-stop").addEventListener("click", stopTail);
  $("publish-form").addEventListener("submit", (event) => {
    event.preventDefault();
    publish(
      $("publish-topic").value.trim(),
      $("publish-body").value,
      $("publish-json").checked,
    );
  });
  $("token").value = sessionStorage.getItem("tinymq-token") || "";
  $("token").addEventListener("change", () => {
    sessionStorage.setItem("tinymq-token", token());
    openFeed();
    if (tailPattern) startTail(tailPattern);
  });

  openFeed();
})();
