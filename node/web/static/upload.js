// The upload page: files chosen or dropped; photographs need a task and a confirmed patient; DICOM
// carries its own. Sends them to POST /api/studies, lists what was accepted or refused and why, then
// follows each study to its result.
import { PatientForm, fileList, followStudy, line, refused, renderStudy, sendStudy } from "./study_form.js";

const form = document.getElementById("study-form");
const input = form.elements.namedItem("files");
const drop = document.getElementById("drop");
const chosen = document.getElementById("chosen");
const photoFields = document.getElementById("photo-fields");
const progress = document.getElementById("progress");
const answer = document.getElementById("answer");
const sendButton = document.getElementById("send");
const patient = new PatientForm(form);

const isPhoto = (file) => /^image\/(jpeg|png)$/.test(file.type) || /\.(jpe?g|png)$/i.test(file.name);

function showChosen() {
  const files = Array.from(input.files);
  chosen.replaceChildren(
    ...files.map((file) => {
      const item = document.createElement("li");
      const kind = isPhoto(file) ? "photograph" : /\.zip$/i.test(file.name) ? "zip archive" : "DICOM";
      item.textContent = `${file.name} (${kind}, ${Math.ceil(file.size / 1024)} KiB)`;
      return item;
    }),
  );
  photoFields.hidden = !files.some(isPhoto);
}

input.addEventListener("change", showChosen);
for (const name of ["dragenter", "dragover"]) {
  drop.addEventListener(name, (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
}
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  input.files = event.dataTransfer.files;
  showChosen();
});

function say(kind, text) {
  const said = line(kind, text);
  answer.append(said);
  return said;
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const files = Array.from(input.files);
  answer.replaceChildren();
  patient.showErrors([]);
  if (!files.length) {
    say("error", "Choose at least one file.");
    return;
  }
  const data = new FormData();
  for (const file of files) data.append("files", file, file.name);
  if (files.some(isPhoto)) {
    const missing = patient.missing();
    if (missing.length) {
      patient.showRefusal(missing);
      return;
    }
    if (!(await patient.confirmIdentity())) return;
    data.append("task", form.elements.namedItem("task").value);
    data.append("laterality", form.elements.namedItem("laterality").value);
    patient.appendTo(data);
  }
  sendButton.disabled = true;
  progress.hidden = false;
  progress.value = 0;
  try {
    const { status, body } = await sendStudy(data, form.dataset.csrf, (share) => {
      progress.value = share;
    });
    progress.hidden = true;
    const why = refused(status, body, patient);
    if (why) {
      answer.append(why);
      return;
    }
    const accepted = body.files.filter((file) => file.status === "accepted").length;
    say(accepted ? "done" : "error", `${accepted} of ${body.files.length} files accepted.`);
    answer.append(fileList(body.files));
    await Promise.all(
      body.studies.map(async (uid) => {
        const waiting = say("hint following", `Study ${uid}: waiting for its result…`);
        const study = await followStudy(uid, (state) => {
          waiting.textContent = `Study ${uid}: ${state.replace("_", " ")}…`;
        });
        waiting.replaceWith(renderStudy(study));
      }),
    );
  } catch (error) {
    progress.hidden = true;
    say("error", String(error.message || error));
  } finally {
    sendButton.disabled = false;
  }
});
