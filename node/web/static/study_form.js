// What the upload and capture pages share: the patient form (typed, or picked from the DICOM
// worklist), the identity question before anything is sent, the upload to POST /api/studies, and
// following the study (GET /api/studies, then its detail) until its result can be shown.

const UNFINISHED = ["receiving", "processing"]; // node.web.api.study_status
const RECENT = 100; // studies listed per poll: an upload is among the newest
const POLL_MS = 700;
const FOLLOW_LIMIT_MS = 10 * 60 * 1000;

// Every server or user text goes in as text (append), never as HTML.
function element(tag, attributes, ...children) {
  const made = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) made.setAttribute(name, value);
  for (const child of children) made.append(child);
  return made;
}

// A line of the page's answer: kind is its class (done, error, hint).
export function line(kind, text) {
  return element("p", { class: kind }, text);
}

// The form field the node's 422 names, as the page shows it: the name is typed as family and given.
const SHOWN_AS = { patient_name: "family_name" };

// Today in the browser's time zone, as an <input type=date> value (toISOString would give UTC's).
function today() {
  const now = new Date();
  return new Date(now.getTime() - now.getTimezoneOffset() * 60000).toISOString().slice(0, 10);
}

// "Hong^Gildong=洪^吉洞" → "Hong Gildong = 洪 吉洞", as the study page shows names.
export function personName(value) {
  return value
    .split("=")
    .map((group) => group.split("^").filter(Boolean).join(" "))
    .filter(Boolean)
    .join(" = ");
}

// The patient form inside ``form``: its values for the API, worklist picking, the server's refusals.
export class PatientForm {
  constructor(form) {
    this.form = form;
    this.errors = form.querySelector(".field-errors");
    this.question = form.querySelector("#confirm-identity");
    this.picked = null;
    const worklist = form.querySelector("#worklist");
    if (worklist) this.wireWorklist(worklist);
  }

  field(name) {
    return this.form.elements.namedItem(name);
  }

  // The DICOM person name: the worklist's own (it may hold ideographic and phonetic groups), else
  // family^given as typed.
  patientName() {
    if (this.picked) return this.picked.patient_name;
    const family = this.field("family_name").value.trim();
    const given = this.field("given_name").value.trim();
    return given ? `${family}^${given}` : family;
  }

  // The details a photograph cannot go without, as the node's 422 names faults; empty when the
  // form may be sent (the node checks the rest).
  missing() {
    const missing = [];
    if (!this.patientName()) missing.push({ field: "family_name", message: "Enter the family name" });
    if (!this.field("patient_id").value.trim()) missing.push({ field: "patient_id", message: "Enter the patient ID" });
    return missing;
  }

  // Appends the patient's details to ``data`` under the API's field names.
  appendTo(data) {
    this.field("patient_name").value = this.patientName();
    for (const name of [
      "patient_name", "patient_id", "patient_birth_date", "patient_sex",
      "accession_number", "study_description", "study_uid",
    ]) {
      data.append(name, this.field(name).value.trim());
    }
  }

  // Says what is wrong with the form as a whole; with no messages, also clears the marks that the
  // node's last refusal put beside the fields.
  showErrors(messages) {
    this.errors.textContent = messages.join(" ");
    this.errors.hidden = messages.length === 0;
    if (messages.length) return;
    for (const shown of this.form.querySelectorAll(".field-error")) shown.remove();
    for (const marked of this.form.querySelectorAll("[aria-invalid]")) {
      marked.removeAttribute("aria-invalid");
      marked.removeAttribute("aria-describedby");
    }
  }

  // The node's refusal of the details (422, one {field, message} per fault): each message beside
  // its field, which is marked invalid and described by it; the rest above the form's end.
  showRefusal(detail) {
    this.showErrors([]);
    const elsewhere = [];
    for (const item of detail) {
      const input = item.field && this.field(SHOWN_AS[item.field] || item.field);
      const label = input && input.closest && input.closest("label");
      const message = item.message || `${(item.loc || []).slice(-1)[0]}: ${item.msg}`;
      if (!label) {
        elsewhere.push(message);
        continue;
      }
      const id = `error-${input.name}`;
      label.append(element("span", { class: "field-error", id }, message));
      input.setAttribute("aria-invalid", "true");
      input.setAttribute("aria-describedby", id);
    }
    this.errors.textContent = elsewhere.join(" ");
    this.errors.hidden = elsewhere.length === 0;
    const first = this.form.querySelector("[aria-invalid=true]");
    if (first) first.focus();
  }

  // Asks "Send for analysis as <name>, <ID>?" in the page and resolves true on yes. The question
  // takes the keyboard's focus; Escape, or a change to the details it names, is a no. Asked again
  // while it is open (a second press of Send), only the first asking is answered yes.
  confirmIdentity() {
    if (this.asking) return Promise.resolve(false);
    const who = `${personName(this.patientName())}, ID ${this.field("patient_id").value.trim()}`;
    this.question.querySelector(".identity").textContent = who;
    this.question.hidden = false;
    const send = this.question.querySelector("#confirm-send");
    const back = this.question.querySelector("#confirm-back");
    const patient = this.form.querySelector("#patient");
    send.focus();
    this.question.scrollIntoView({ block: "nearest" });
    this.asking = new Promise((resolve) => {
      const answer = (yes) => {
        this.question.hidden = true;
        this.asking = null;
        send.removeEventListener("click", onYes);
        back.removeEventListener("click", onNo);
        this.question.removeEventListener("keydown", onKey);
        patient.removeEventListener("input", onNo);
        resolve(yes);
      };
      const onYes = () => answer(true);
      const onNo = () => answer(false);
      const onKey = (event) => {
        if (event.key === "Escape") answer(false);
      };
      send.addEventListener("click", onYes);
      back.addEventListener("click", onNo);
      this.question.addEventListener("keydown", onKey);
      patient.addEventListener("input", onNo);
    });
    return this.asking;
  }

  wireWorklist(worklist) {
    const panel = worklist.querySelector("#worklist-panel");
    const message = worklist.querySelector("#worklist-message");
    const table = worklist.querySelector("table");
    const name = worklist.querySelector("#worklist-name");
    const date = worklist.querySelector("#worklist-date");
    const opener = worklist.querySelector("#worklist-open");
    date.value = today();
    opener.addEventListener("click", () => {
      panel.hidden = !panel.hidden;
      opener.setAttribute("aria-expanded", String(!panel.hidden));
      if (!panel.hidden) name.focus();
    });
    worklist.querySelector("#worklist-clear").addEventListener("click", () => this.choose(null));
    const search = async () => {
      const typed = name.value.trim();
      // A typed name is the start of the patient's name, as people search; DICOM wildcards as given.
      const query = new URLSearchParams({ name: typed && !/[*?]/.test(typed) ? `${typed}*` : typed });
      if (date.value) query.set("date", date.value);
      message.textContent = "Asking the worklist…";
      table.hidden = true;
      let response;
      try {
        response = await fetch(`/api/worklist?${query}`, { credentials: "same-origin" });
      } catch {
        message.textContent = "The node could not be reached: type the details instead.";
        return;
      }
      if (response.status === 503) {
        worklist.hidden = true; // no worklist configured: type the details
        return;
      }
      const body = await response.json().catch(() => ({}));
      if (!response.ok) {
        message.textContent = `The worklist did not answer: ${body.detail || response.status}. Type the details instead.`;
        return;
      }
      message.textContent = body.length ? `${body.length} scheduled` : "Nobody scheduled matches.";
      table.querySelector("tbody").replaceChildren(...body.map((entry) => this.entryRow(entry)));
      table.hidden = body.length === 0;
    };
    worklist.querySelector("#worklist-search").addEventListener("click", search);
    for (const input of [name, date]) {
      input.addEventListener("keydown", (event) => {
        if (event.key !== "Enter") return;
        event.preventDefault(); // a search, not the form's submission
        search();
      });
    }
  }

  entryRow(entry) {
    const who = personName(entry.patient_name);
    const choose = element(
      "button",
      { type: "button", class: "secondary", "aria-label": `Choose ${who}, ID ${entry.patient_id}` },
      "Choose",
    );
    choose.addEventListener("click", () => this.choose(entry));
    return element(
      "tr",
      {},
      element("td", {}, choose), // first: within reach on a phone, where the table scrolls sideways
      element("td", { class: "patient-name" }, who),
      element("td", {}, entry.patient_id),
      element("td", {}, entry.patient_birth_date || ""),
      element("td", {}, entry.accession_number || ""),
      element("td", {}, (entry.scheduled || "").replace("T", " ")),
      element("td", {}, entry.study_description || ""),
    );
  }

  // Fills the form from a worklist entry, read-only (the worklist is the record), or clears it.
  choose(entry) {
    this.picked = entry;
    const chosen = this.form.querySelector("#worklist-chosen");
    const [family, given] = entry ? entry.patient_name.split("=")[0].split("^") : ["", ""];
    const values = {
      family_name: family || "",
      given_name: given || "",
      patient_id: entry ? entry.patient_id : "",
      patient_birth_date: entry ? entry.patient_birth_date || "" : "",
      patient_sex: entry ? entry.patient_sex || "" : "",
      accession_number: entry ? entry.accession_number || "" : "",
      study_description: entry ? entry.study_description || "" : "",
      study_uid: entry ? entry.study_uid || "" : "",
    };
    for (const [name, value] of Object.entries(values)) {
      const input = this.field(name);
      input.value = value;
      if (input.type !== "hidden") {
        if (input.tagName === "SELECT") input.disabled = Boolean(entry);
        else input.readOnly = Boolean(entry);
      }
    }
    chosen.hidden = !entry;
    chosen.querySelector("span").textContent = entry
      ? `From the worklist: ${personName(entry.patient_name)}, ID ${entry.patient_id}. `
      : "";
    this.form.querySelector("#worklist-panel").hidden = true;
    this.form.querySelector("#worklist-open").setAttribute("aria-expanded", "false");
    this.showErrors([]);
  }
}

// POST /api/studies with upload progress; resolves {status, body}.
export function sendStudy(data, csrf, progress) {
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    request.open("POST", "/api/studies");
    request.setRequestHeader("X-CSRF-Token", csrf);
    request.responseType = "json";
    request.upload.addEventListener("progress", (event) => {
      if (progress && event.lengthComputable) progress(event.loaded / event.total);
    });
    request.addEventListener("load", () => resolve({ status: request.status, body: request.response || {} }));
    request.addEventListener("error", () => reject(new Error("the node could not be reached")));
    request.send(data);
  });
}

// The node's answer when it looked at no file: the patient details' faults beside their fields
// (422), or a line saying why; null when it did look at the files (body.files lists them).
export function refused(status, body, patient) {
  if (body.files) return null;
  if (status === 422 && Array.isArray(body.detail)) {
    patient.showRefusal(body.detail);
    return line("error", "Not sent: correct the details marked in the patient form.");
  }
  const why = typeof body.detail === "string"
    ? body.detail
    : { 413: "the upload is too large for the node", 403: "not allowed: log in again" }[status] ||
      `the node answered ${status}`;
  return line("error", `Not sent: ${why}.`);
}

// The files' fate as a list: accepted, or refused and why.
export function fileList(files) {
  return element(
    "ul",
    { class: "files" },
    ...files.map((file) =>
      element(
        "li",
        { class: `file-${file.status}` },
        `${file.name}: ${file.status}${file.reason ? ` (${file.reason})` : ""}`,
      ),
    ),
  );
}

function jobsOf(study) {
  return study.series.flatMap((series) => series.jobs);
}

// Polls the newest studies (their status, no patient data: nothing to audit, and no 404 while the
// upload is still being indexed) until this one is past receiving and processing, then reads its
// detail once; ``progress`` hears each status on the way.
export async function followStudy(uid, progress) {
  const started = Date.now();
  for (;;) {
    const response = await fetch(`/api/studies?limit=${RECENT}`, { credentials: "same-origin" });
    const found = response.ok ? (await response.json()).find((row) => row.study_uid === uid) : undefined;
    if (found && !UNFINISHED.includes(found.status)) {
      const detail = await fetch(`/api/studies/${encodeURIComponent(uid)}`, { credentials: "same-origin" });
      if (!detail.ok) throw new Error(`the study could not be read: ${detail.status}`);
      return detail.json();
    }
    if (found && progress) progress(found.status);
    if (Date.now() - started > FOLLOW_LIMIT_MS) throw new Error("no result after ten minutes: see the study page");
    await new Promise((resolve) => window.setTimeout(resolve, POLL_MS));
  }
}

function findingsTable(findings) {
  const rows = findings.map((finding) =>
    element(
      "tr",
      { class: finding.present ? "present" : "absent" },
      element("td", {}, finding.meaning),
      element("td", {}, finding.present ? "present" : "absent"),
      element("td", {}, finding.probability == null ? "–" : finding.probability.toFixed(3)),
      element("td", {}, finding.threshold == null ? "–" : String(finding.threshold)),
    ),
  );
  return element(
    "table",
    { class: "findings" },
    element("thead", {}, element("tr", {}, ...["Finding", "Result", "Probability", "Threshold"].map((h) => element("th", {}, h)))),
    element("tbody", {}, ...rows),
  );
}

// The study's result, as the study page shows it: per job its outcome, findings and overlays.
// ``notAnalysed(reason)`` may add advice (the capture page's Retake).
export function renderStudy(study, notAnalysed) {
  const uid = study.study_uid;
  const block = element("article", { class: "study-result", "data-study": uid });
  block.append(
    element(
      "h2",
      {},
      "Result ",
      element("span", { class: `status status-${study.status}` }, study.status.replace("_", " ")),
    ),
  );
  if (study.status === "no_route") {
    block.append(element("p", { class: "notice not-analysed" }, "Not analysed: no route takes this study (see the study page for why)."));
  }
  for (const job of jobsOf(study)) {
    const section = element("section", { class: "job" });
    section.append(element("h3", {}, `${job.model} ${job.model_version} — `, element("span", { class: `status status-${job.status}` }, job.status)));
    const outcome = job.outcome || {};
    if (job.status === "failed") section.append(element("p", { class: "error" }, `Failed: ${job.error}`));
    if (outcome.analysed === false) {
      section.append(element("p", { class: "notice not-analysed" }, `Not analysed: ${outcome.not_analysed_reason}`));
      if (notAnalysed) section.append(notAnalysed(outcome.not_analysed_reason));
    }
    if (job.summary) section.append(element("p", { class: "summary" }, job.summary));
    if ((outcome.findings || []).length) {
      section.append(element("div", { class: "scroll" }, findingsTable(outcome.findings)));
    }
    const outlined = job.results.filter((result) => result.kind === "SEG");
    for (const result of job.results.filter((r) => r.kind === "SC")) {
      const src = `/studies/${encodeURIComponent(uid)}/results/${encodeURIComponent(result.sop_uid)}.png`;
      section.append(
        element(
          "figure",
          {},
          element("img", { class: "overlay", src, alt: `overlay image ${result.sop_uid}` }),
          element(
            "figcaption",
            {},
            outcome.analysed === false
              ? "The image as the node received it, with why it was not analysed."
              : outlined.length
                ? "Where the model looked (heat map), with the lesion's outline from its segmentation (green)."
                : "Where the model looked (heat map).",
          ),
        ),
      );
    }
    if (outlined.length) {
      section.append(element("p", { class: "seg" }, `Segmentation stored (DICOM SEG): ${outlined.map((r) => r.sop_uid).join(", ")}`));
    }
    block.append(section);
  }
  block.append(element("p", {}, element("a", { href: `/studies/${encodeURIComponent(uid)}` }, "Open the study page")));
  return block;
}
