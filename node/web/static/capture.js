// The camera page: a live preview with the task's frame guide over it (the conjunctiva's closed cubic
// Bezier outline, or a circle for a skin lesion), a capture, the region inside the frame as it will
// be analysed (outside masked white and cropped to the frame, as the prototype did), confirm or
// retake, and the node's result on the same page.
import { PatientForm, fileList, followStudy, line, refused, renderStudy, sendStudy } from "./study_form.js";

const form = document.getElementById("study-form");
const guides = JSON.parse(form.dataset.guides);
const task = document.getElementById("task");
const hint = document.getElementById("guide-hint");
const problem = document.getElementById("camera-problem");
const live = document.getElementById("live");
const liveButtons = document.getElementById("live-buttons");
const video = document.getElementById("video");
const overlay = document.getElementById("guide");
const preview = document.getElementById("preview");
const picture = document.getElementById("picture");
const confirmButton = document.getElementById("confirm");
const takeButton = document.getElementById("take");
const answer = document.getElementById("answer");
const patient = new PatientForm(form);

const HINTS = {
  bezier: "Pull the lower eyelid down and fit its pink inner side inside the frame, with some of the white of the eye.",
  circle: "Centre the lesion inside the circle, the camera a hand's width from the skin.",
};
const ADVICE = [
  [/dark/i, "Move to better light, or turn on the room light, and retake."],
  [/sclera|white of the eye/i, "Pull the eyelid down further so the white of the eye shows inside the frame, and retake."],
  [/blur/i, "Hold the camera still, let it focus, and retake."],
  [/overexposed|clipped/i, "Move away from the direct light or the flash, and retake."],
];

const guideKind = () => task.selectedOptions[0].dataset.guide;
let stream = null; // the camera while it is on

// The Bezier frame's points are fractions of a 4:3 picture (the prototype's camera). On a picture
// of another shape (a phone held upright gives 3:4, a webcam 16:9) they are fractions of the
// largest 4:3 box centred in it, so the frame keeps its shape instead of being stretched.
const FRAME_ASPECT = 4 / 3;

// The frame as a path on a (width × height) picture, and its bounding box [x0, y0, x1, y1].
function frame(width, height) {
  const path = new Path2D();
  if (guideKind() === "circle") {
    const radius = guides.circle * Math.min(width, height);
    path.arc(width / 2, height / 2, radius, 0, 2 * Math.PI);
    return { path, box: [width / 2 - radius, height / 2 - radius, width / 2 + radius, height / 2 + radius] };
  }
  const boxWidth = Math.min(width, height * FRAME_ASPECT);
  const boxHeight = boxWidth / FRAME_ASPECT;
  const left = (width - boxWidth) / 2;
  const top = (height - boxHeight) / 2;
  const points = guides.bezier.map(([x, y]) => [left + x * boxWidth, top + y * boxHeight]);
  path.moveTo(...points[0]);
  const xs = [];
  const ys = [];
  for (let i = 0; i + 3 < points.length; i += 3) {
    const [p0, p1, p2, p3] = points.slice(i, i + 4);
    path.bezierCurveTo(...p1, ...p2, ...p3);
    for (let step = 0; step <= 32; step += 1) {
      // The curve itself, not its control points, bounds the region.
      const t = step / 32;
      const a = (1 - t) ** 3, b = 3 * (1 - t) ** 2 * t, c = 3 * (1 - t) * t ** 2, d = t ** 3;
      xs.push(a * p0[0] + b * p1[0] + c * p2[0] + d * p3[0]);
      ys.push(a * p0[1] + b * p1[1] + c * p2[1] + d * p3[1]);
    }
  }
  path.closePath();
  return { path, box: [Math.min(...xs), Math.min(...ys), Math.max(...xs), Math.max(...ys)] };
}

function drawGuide() {
  hint.textContent = HINTS[guideKind()];
  const width = video.videoWidth;
  const height = video.videoHeight;
  if (!width || !height) return;
  overlay.width = width;
  overlay.height = height;
  const context = overlay.getContext("2d");
  const { path } = frame(width, height);
  context.clearRect(0, 0, width, height);
  const outside = new Path2D();
  outside.rect(0, 0, width, height);
  outside.addPath(path);
  context.fillStyle = "rgba(0, 0, 0, 0.45)";
  context.fill(outside, "evenodd");
  context.lineWidth = Math.max(2, width / 200);
  context.strokeStyle = "#ffd400";
  context.stroke(path);
}

function cameraProblem(error) {
  const reasons = {
    NotAllowedError: "Camera access was refused. Allow the camera for this site in the browser's settings, then reload the page.",
    SecurityError: "Camera access was refused. Allow the camera for this site in the browser's settings, then reload the page.",
    NotFoundError: "No camera was found on this device. Use the Upload page to send a photograph instead.",
    OverconstrainedError: "No suitable camera was found on this device. Use the Upload page to send a photograph instead.",
    NotReadableError: "The camera is in use by another application, or failed. Close it there and reload the page.",
  };
  problem.textContent = reasons[error.name] || `The camera could not be started: ${error.message || error.name}`;
  problem.hidden = false;
}

// Capture is possible once a frame of the camera's is on screen (not merely once its size is
// known: an earlier capture would be black).
function takeableOnFirstFrame() {
  takeButton.disabled = true;
  if ("requestVideoFrameCallback" in video) {
    video.requestVideoFrameCallback(() => {
      takeButton.disabled = false;
    });
  } else {
    video.addEventListener("playing", () => (takeButton.disabled = false), { once: true });
  }
}

async function startCamera() {
  if (!window.isSecureContext || !navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    problem.textContent =
      "The camera needs a secure connection: open this page over HTTPS (https://…), as a phone's browser " +
      "allows the camera only there. The Upload page takes photographs without it.";
    problem.hidden = false;
    return;
  }
  try {
    stream = await navigator.mediaDevices.getUserMedia({
      audio: false,
      // The rear camera where there is one; 4:3, the frame's own shape, where the camera offers it.
      video: { facingMode: { ideal: "environment" }, width: { ideal: 1600 }, height: { ideal: 1200 } },
    });
  } catch (error) {
    cameraProblem(error);
    return;
  }
  problem.hidden = true;
  takeableOnFirstFrame();
  video.srcObject = stream;
  live.hidden = false;
  liveButtons.hidden = false;
}

// Turns the camera off (its light too): after a capture, and when the page is left.
function stopCamera() {
  if (stream) for (const track of stream.getTracks()) track.stop();
  stream = null;
  video.srcObject = null;
}

function showLive() {
  answer.replaceChildren();
  preview.hidden = true;
  confirmButton.disabled = false;
  startCamera();
}

// The picture inside the frame: cropped to the frame's box, everything outside the frame white.
function take() {
  const width = video.videoWidth;
  const height = video.videoHeight;
  const whole = document.createElement("canvas");
  whole.width = width;
  whole.height = height;
  whole.getContext("2d").drawImage(video, 0, 0, width, height);
  const { path, box } = frame(width, height);
  const x0 = Math.max(0, Math.floor(box[0]));
  const y0 = Math.max(0, Math.floor(box[1]));
  const x1 = Math.min(width, Math.ceil(box[2]));
  const y1 = Math.min(height, Math.ceil(box[3]));
  picture.width = x1 - x0;
  picture.height = y1 - y0;
  const context = picture.getContext("2d");
  context.fillStyle = "#ffffff";
  context.fillRect(0, 0, picture.width, picture.height);
  context.save();
  context.translate(-x0, -y0);
  context.clip(path);
  context.drawImage(whole, 0, 0);
  context.restore();
  stopCamera();
  takeButton.disabled = true;
  live.hidden = true;
  liveButtons.hidden = true;
  preview.hidden = false;
  answer.replaceChildren();
}

function advice(reason) {
  const found = ADVICE.find(([pattern]) => pattern.test(reason));
  const box = document.createElement("div");
  box.className = "retake-advice";
  const text = document.createElement("p");
  text.textContent = found ? found[1] : "Retake the photograph.";
  const again = document.createElement("button");
  again.type = "button";
  again.textContent = "Retake";
  again.addEventListener("click", showLive);
  box.append(text, again);
  return box;
}

function say(kind, text) {
  const said = line(kind, text);
  answer.replaceChildren(said);
  return said;
}

async function confirmPicture() {
  patient.showErrors([]);
  const missing = patient.missing();
  if (missing.length) {
    patient.showRefusal(missing);
    return;
  }
  if (!(await patient.confirmIdentity())) return;
  confirmButton.disabled = true;
  const blob = await new Promise((resolve) => picture.toBlob(resolve, "image/png"));
  const data = new FormData();
  data.append("files", blob, `capture-${task.value}.png`);
  data.append("task", task.value);
  data.append("laterality", form.elements.namedItem("laterality").value);
  patient.appendTo(data);
  const waiting = say("hint following", "Sending…");
  try {
    const { status, body } = await sendStudy(data, form.dataset.csrf);
    const why = refused(status, body, patient);
    if (why) {
      answer.replaceChildren(why);
      confirmButton.disabled = false;
      return;
    }
    if (status !== 201) {
      answer.replaceChildren(fileList(body.files), advice(""));
      return;
    }
    waiting.textContent = "Sent; waiting for the analysis…";
    const study = await followStudy(body.studies[0], (state) => {
      waiting.textContent = `Analysis: ${state.replace("_", " ")}…`;
    });
    answer.replaceChildren(renderStudy(study, advice));
  } catch (error) {
    say("error", String(error.message || error));
    confirmButton.disabled = false;
  }
}

task.addEventListener("change", () => {
  if (!preview.hidden) showLive(); // the picture was cut with the other task's frame: take it again
  drawGuide();
});
video.addEventListener("loadedmetadata", drawGuide);
video.addEventListener("resize", drawGuide); // the phone turned: the picture changed shape
takeButton.addEventListener("click", take);
document.getElementById("retake").addEventListener("click", showLive);
form.addEventListener("submit", (event) => event.preventDefault()); // Enter in a field sends nothing
window.addEventListener("pagehide", stopCamera);
window.addEventListener("pageshow", (event) => {
  if (event.persisted && preview.hidden) startCamera(); // back to the page from the browser's cache
});
confirmButton.addEventListener("click", confirmPicture);
hint.textContent = HINTS[guideKind()];
startCamera();
