// The "waiting for peers" panel: shown while no peer is live, with the command a peer machine
// runs and the coordinator's address filled in from the status document's `join` field
// (coordinator/http.py, join_info). The join token itself is never served: the panel names the
// file the coordinator read it from, which the operator copies to the peer machine.

import { departed, setText, unknown } from "./util.js";

const $ = (id) => document.getElementById(id);
const JOIN_KINDS = new Set(["join", "rejoin"]);

/** "never": no peer has ever joined; "none-live": peers were here, none is live now; "" else. */
export function swarmEmptiness(s) {
  const peers = s.peers ?? [];
  if (peers.some((p) => !departed(p))) return "";
  const joined = peers.length > 0 || (s.events ?? []).some((e) => JOIN_KINDS.has(e.kind));
  return joined ? "none-live" : "never";
}

/** The command a peer machine runs, from `join` (or, from an older coordinator, its address). */
function joinCommand(s) {
  const j = s.join ?? {};
  if (!unknown(j.command)) return j.command;
  const addr = j.coordinator ?? s.coordinator?.grpc_address;
  return unknown(addr) ? null : `shoal peer --coordinator ${addr} --token-file join.token`;
}

export function renderJoin(s) {
  const panel = $("join");
  const emptiness = swarmEmptiness(s);
  panel.hidden = !emptiness;
  panel.dataset.emptiness = emptiness;
  if (!emptiness) return;
  const j = s.join ?? {};
  const addr = j.coordinator ?? s.coordinator?.grpc_address;
  setText(
    $("join-title"),
    emptiness === "never" ? "Waiting for peers" : "No live peer: waiting for peers to join again",
  );
  setText(
    $("join-lead"),
    emptiness === "never"
      ? "No peer has joined this swarm yet. On each machine that should train, run:"
      : "Every peer that was here has left or lost its lease. To bring the swarm back, run on " +
          "each machine that should train:",
  );
  setText($("join-command"), joinCommand(s) ?? "shoal peer --coordinator HOST:PORT --token-file F");
  setText($("join-coordinator"), unknown(addr) ? "unknown" : addr);
  setText($("join-fingerprint"), unknown(j.fingerprint) ? "–" : j.fingerprint);
  const tokenRow = $("join-token-row");
  tokenRow.hidden = unknown(j.token_file);
  setText(
    $("join-token"),
    unknown(j.token_file)
      ? ""
      : `${j.token_file} on the coordinator's machine: copy it to the peer machine (mode 0600, ` +
          "after the coordinator's first start, so that it holds the fingerprint). " +
          "This page never shows the token.",
  );
}
