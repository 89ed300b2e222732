"""The upload and camera pages as an operator uses them: Debian's Chromium, headless and driven by
Playwright, against a real node process whose results go to a real Orthanc, which also serves the
DICOM worklist patients are picked from. The camera is Chromium's fake one, playing a Y4M file the
test makes from a synthetic conjunctiva photograph. Screenshots go to ``test-artifacts/screenshots/``,
named ``capture-*``."""

from __future__ import annotations

import base64
import copy
import time
import tomllib
import zipfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
import pytest
from playwright.sync_api import Browser, FilePayload, Page, Playwright, ViewportSize, expect, sync_playwright

from node.config import CaptureSettings
from tests import test_browser as desk
from tests import test_end_to_end as end_to_end
from tests.peers import REPO, NodeProcess, OrthancServer, dciodvfy_errors, free_port, write_worklist_entry
from training import conjunctiva_phantom, skin_phantom

pytestmark = pytest.mark.slow

OPERATOR = "oscar"
PHONE: ViewportSize = {"width": 390, "height": 844}
VIDEO_SIZE = (480, 640)  # (rows, columns) of the fake camera's picture
UPRIGHT = (640, 480)  # a phone's camera held upright
FRAME_ASPECT = 4 / 3  # the conjunctiva frame's points are fractions of a 4:3 box (capture.js)
EYE_SEED = 5  # the phantom eye the fake camera shows
EYE_SCALE = 0.8  # the phantom's eye over the frame: as a person fills the guide
DARKENED = 0.1  # the same picture in a dim room
SHAKE = 4.0  # the same picture blurred, Gaussian sigma in pixels: a hand that moved
RESULT_TIMEOUT_MS = 240_000  # how long Playwright waits for a result: the first job loads its model
# How long Playwright waits for the camera's first frame on screen: starting the fake camera on a
# loaded machine can take longer than expect's default 5 s
CAMERA_TIMEOUT_MS = 60_000


class Camera(desk.Camera):
    """test_browser's numbered screenshots, prefixed so that both files' pictures live side by side."""

    def shoot(self, page: Page, name: str) -> Path:
        self.count += 1
        path = self.folder / f"capture-{self.count:02d}-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        return path


def example_routes(*names: str) -> list[dict[str, Any]]:
    """Routes as config.example.toml writes them: the photograph tasks' routes are the ones sites use."""
    routes = tomllib.loads((REPO / "config.example.toml").read_text())["routes"]
    return [route for route in routes if route["name"] in names]


@pytest.fixture(scope="module")
def camera() -> Camera:
    desk.SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for old in desk.SCREENSHOTS.glob("capture-*.png"):
        old.unlink()
    return Camera(desk.SCREENSHOTS)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[desk.Site]:
    """test_browser's node (head CTs) with the photograph routes, and a worklist on its Orthanc."""
    folder = tmp_path_factory.mktemp("capture")
    # Worklist answers in UTF-8: Orthanc's default, Latin-1, cannot carry a name's ideographic groups.
    utf8 = {"DefaultEncoding": "Utf8"}
    orthanc = OrthancServer(folder / "orthanc", worklists=folder / "worklists", options=utf8).start()
    settings = desk.node_settings(free_port(), orthanc.dicom_port)
    settings["routes"] += example_routes("skin-photo", "conjunctiva-anemia")
    settings["worklist"] = {"host": "127.0.0.1", "port": orthanc.dicom_port, "ae_title": orthanc.aet}
    node = NodeProcess(folder / "node", settings).start()
    try:
        desk.add_user(node, OPERATOR, desk.USERS[OPERATOR])
        yield desk.Site(node, orthanc, folder)
    finally:
        node.stop()
        orthanc.stop()


@pytest.fixture(scope="module")
def driver() -> Iterator[Playwright]:
    if desk.CHROMIUM is None:
        pytest.skip("no chromium on the PATH: bash deploy/install.sh --test installs Debian's")
    with sync_playwright() as playwright:
        yield playwright


@pytest.fixture(scope="module")
def browser(driver: Playwright) -> Iterator[Browser]:
    chromium = driver.chromium.launch(executable_path=desk.CHROMIUM, headless=True)
    yield chromium
    chromium.close()


def camera_browser(driver: Playwright, video: Path) -> Browser:
    """A Chromium whose only camera plays ``video``, allowed without asking (a browser per file:
    the file is fixed at launch)."""
    return driver.chromium.launch(
        executable_path=desk.CHROMIUM,
        headless=True,
        args=[
            "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-video-capture={video}",
        ],
    )


def write_y4m(path: Path, rgb: np.ndarray, frames: int = 10) -> Path:
    """A Y4M video (4:2:0, what Chromium's fake camera plays in a loop) of ``rgb`` held still."""
    rows, cols = rgb.shape[:2]
    planes = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420).tobytes()  # Y, then U, then V
    with path.open("wb") as video:
        video.write(f"YUV4MPEG2 W{cols} H{rows} F10:1 Ip A1:1 C420\n".encode())
        for _ in range(frames):
            video.write(b"FRAME\n" + planes)
    return path


def frame_box(width: int, height: int) -> tuple[float, float, float, float]:
    """The default conjunctiva frame's bounding box in pixels, from its curve (as the page crops):
    its points are fractions of the largest 4:3 box centred in the picture."""
    box_width = min(width, height * FRAME_ASPECT)
    box_height = box_width / FRAME_ASPECT
    corner = ((width - box_width) / 2, (height - box_height) / 2)
    points = np.asarray(CaptureSettings().conjunctiva_frame) * (box_width, box_height) + corner
    t = np.linspace(0, 1, 33)[:, None]
    curve = np.concatenate(
        [
            (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3 * p3
            for p0, p1, p2, p3 in (points[i : i + 4] for i in range(0, len(points) - 1, 3))
        ]
    )
    (x0, y0), (x1, y1) = curve.min(axis=0), curve.max(axis=0)
    return x0, y0, x1, y1


def framed_eye(shape: tuple[int, int] = VIDEO_SIZE) -> np.ndarray:
    """A synthetic eye photograph as a person takes it with the guide: the eye (its white and the
    pulled-down conjunctiva) scaled and moved into the middle of the conjunctiva frame."""
    rows, cols = shape
    phantom = conjunctiva_phantom.render(np.random.default_rng(EYE_SEED), "eye", shape=shape)
    ys, xs = np.nonzero(phantom.sclera | phantom.conjunctiva)
    x0, y0, x1, y1 = frame_box(cols, rows)
    shift_x = (x0 + x1) / 2 - EYE_SCALE * (xs.min() + xs.max()) / 2
    shift_y = (y0 + y1) / 2 - EYE_SCALE * (ys.min() + ys.max()) / 2
    move = np.array([[EYE_SCALE, 0, shift_x], [0, EYE_SCALE, shift_y]], np.float32)
    return cv2.warpAffine(phantom.rgb, move, (cols, rows), borderMode=cv2.BORDER_REFLECT)


@pytest.fixture(scope="module")
def eye_videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("camera")
    eye = framed_eye()
    pictures = {
        "eye": eye,
        "dark": np.clip(eye.astype(np.float32) * DARKENED, 0, 255).astype(np.uint8),
        "blurred": cv2.GaussianBlur(eye, (0, 0), SHAKE),
        "upright": framed_eye(UPRIGHT),
    }
    return {name: write_y4m(folder / f"{name}.y4m", picture) for name, picture in pictures.items()}


def png_file(name: str, rgb: np.ndarray) -> FilePayload:
    """An RGB picture as a PNG file chosen in a file input."""
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    assert ok
    return {"name": name, "mimeType": "image/png", "buffer": encoded.tobytes()}


def decoded(data: bytes, flags: int) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    assert image is not None, "not an image"
    return image


def canvas_rgba(page: Page, selector: str) -> np.ndarray:
    """A canvas's pixels as the page drew them, (rows, columns, RGBA)."""
    url = page.locator(selector).evaluate("canvas => canvas.toDataURL('image/png')")
    return cv2.cvtColor(
        decoded(base64.b64decode(url.split(",", 1)[1]), cv2.IMREAD_UNCHANGED), cv2.COLOR_BGRA2RGBA
    )


def operator_page(browser: Browser, site: desk.Site, viewport: ViewportSize | None = None) -> Page:
    """The operator logged in through the login form; in a phone-sized context when ``viewport``."""
    page = desk.log_in(browser, site, OPERATOR)
    if viewport is None:
        return page
    state = page.context.storage_state()
    page.context.close()
    phone = browser.new_context(
        base_url=site.node.url, viewport=viewport, is_mobile=True, has_touch=True, storage_state=state
    )
    return phone.new_page()


def type_patient(page: Page, family: str, given: str, patient_id: str) -> None:
    page.fill("input[name=family_name]", family)
    page.fill("input[name=given_name]", given)
    page.fill("input[name=patient_id]", patient_id)
    page.fill("input[name=patient_birth_date]", "1961-07-14")
    page.select_option("select[name=patient_sex]", "F")


def send_confirmed(page: Page, button: str, who: str) -> None:
    """Press ``button``, check the identity question names ``who``, and say yes."""
    page.click(button)
    question = page.locator("#confirm-identity")
    expect(question).to_be_visible()
    expect(question.locator(".identity")).to_contain_text(who)
    page.click("#confirm-send")


def result_of(page: Page) -> Any:
    """The study's result block once it is on screen."""
    result = page.locator("#answer .study-result")
    expect(result).to_be_visible(timeout=RESULT_TIMEOUT_MS)
    return result


def overlays_shown(page: Page, result: Any) -> list[np.ndarray]:
    """Each overlay image the result shows, loaded in the page and fetched as the browser did."""
    images = result.locator("img.overlay")
    shown = []
    for index in range(images.count()):
        image = images.nth(index)
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
        fetched = page.request.get(image.get_attribute("src") or "")
        assert fetched.status == 200
        shown.append(decoded(fetched.body(), cv2.IMREAD_COLOR))
    return shown


def orthanc_instances(site: desk.Site, study_uid: str, kind: str) -> list[pydicom.Dataset]:
    """The node's results of ``kind`` in the PACS for a study, once they are there."""
    found = end_to_end.wait_for_results(site.orthanc, study_uid)
    stored: list[pydicom.Dataset] = []
    for instance_id in found[kind]:
        path = site.folder / f"{kind}-{instance_id}.dcm"
        path.write_bytes(site.orthanc.file(instance_id))
        assert dciodvfy_errors(path) == [], dciodvfy_errors(path)
        stored.append(pydicom.dcmread(path))
    return stored


def test_a_skin_photograph_is_uploaded_and_outlined(
    browser: Browser, site: desk.Site, camera: Camera
) -> None:
    """A typed patient and a photograph: the identity question, the files' fate, then the overlay with
    the lesion's green outline from the segmentation, the findings, and the SR in the PACS."""
    page = operator_page(browser, site)
    problems = desk.problems_on(page, site)
    page.click("nav >> text=Upload")
    expect(page.locator("main > h1")).to_have_text("Upload")
    lesion = skin_phantom.render(np.random.default_rng(7), "mel")
    page.set_input_files("input[name=files]", files=[png_file("lesion.png", lesion.rgb)])
    expect(page.locator("#photo-fields")).to_be_visible()
    page.select_option("select[name=task]", "skin")
    type_patient(page, "Müller-Łukasiewicz", "Zoë", "SKIN-0042")
    camera.shoot(page, "upload-photo-form")
    send_confirmed(page, "#send", "Müller-Łukasiewicz Zoë, ID SKIN-0042")
    expect(page.locator("#answer ul.files")).to_contain_text("lesion.png: accepted")

    result = result_of(page)
    expect(result.locator("section.job h3 .status")).to_have_text("done")
    expect(result.locator("table.findings tbody tr")).to_have_count(len(skin_phantom.CLASSES))
    expect(result.locator("figcaption")).to_contain_text("outline from its segmentation")
    expect(result.locator("p.seg")).to_contain_text("DICOM SEG")
    (overlay,) = overlays_shown(page, result)
    green = np.all(overlay == (0, 255, 0), axis=2)  # BGR: the outline's colour, never the heat map's
    assert green.sum() > 50, "no segmentation outline on the overlay"
    camera.shoot(page, "upload-photo-result")

    study_uid = result.get_attribute("data-study")
    (report,) = orthanc_instances(site, study_uid, "SR")
    assert str(report.PatientName) == "Müller-Łukasiewicz^Zoë" and report.PatientID == "SKIN-0042"
    assert problems == []
    page.context.close()


def test_wrong_patient_details_are_marked_and_nothing_is_stored(
    browser: Browser, site: desk.Site, camera: Camera
) -> None:
    """A birth date in the future: the node refuses the upload, the form says why beside the field."""
    page = operator_page(browser, site)
    page.goto("/upload")
    before = len(site.node.api("/api/studies"))
    lesion = skin_phantom.render(np.random.default_rng(9), "bkl")
    page.set_input_files("input[name=files]", files=[png_file("future.png", lesion.rgb)])
    page.select_option("select[name=task]", "skin")
    uploads: list[str] = []
    page.on("request", lambda sent: uploads.append(sent.url) if sent.method == "POST" else None)
    page.click("#send")  # no patient yet: said beside the fields, nothing asked or sent
    expect(page.locator("label:has(input[name=patient_id]) .field-error")).to_have_text(
        "Enter the patient ID"
    )
    expect(page.locator("input[name=family_name]")).to_be_focused()
    expect(page.locator("#confirm-identity")).to_be_hidden()
    type_patient(page, "Future", "Person", "SKIN-0099")
    page.fill("input[name=patient_birth_date]", "2999-01-01")
    page.click("#send")  # pressed twice while the question is open: one question, one upload
    with page.expect_response("**/api/studies") as answer:
        send_confirmed(page, "#send", "Future Person, ID SKIN-0099")
    assert answer.value.status == 422
    birth_date = page.locator("input[name=patient_birth_date]")
    beside = page.locator("label:has(input[name=patient_birth_date]) .field-error")
    expect(beside).to_have_text("Birth date is in the future")
    expect(birth_date).to_have_attribute("aria-invalid", "true")
    expect(birth_date).to_have_attribute("aria-describedby", beside.get_attribute("id") or "")
    expect(birth_date).to_be_focused()
    expect(page.locator("label:has(input[name=patient_id]) .field-error")).to_have_count(0)
    expect(page.locator("#answer")).to_contain_text("Not sent: correct the details")
    assert len(uploads) == 1
    expect(page.locator("#answer .study-result")).to_have_count(0)
    camera.shoot(page, "upload-refused-details")
    page.fill("input[name=patient_birth_date]", "1961-07-14")
    send_confirmed(page, "#send", "Future Person, ID SKIN-0099")  # corrected: the marks go
    expect(page.locator("#answer ul.files")).to_contain_text("future.png: accepted")
    expect(page.locator(".field-error")).to_have_count(0)
    expect(birth_date).not_to_have_attribute("aria-invalid", "true")
    assert len(site.node.api("/api/studies")) == before + 1
    page.context.close()


def test_a_ct_series_is_uploaded(browser: Browser, site: desk.Site, camera: Camera) -> None:
    """DICOM files carry their own patient: no questions, and the head-CT result on the page. Half
    the slices come zipped, half loose; a file that is not DICOM among them is refused with a
    reason, the others taken."""
    page = operator_page(browser, site)
    problems = desk.problems_on(page, site)
    page.goto("/upload")
    study_uid, files = desk.write_study(site.folder, seed=404, hemorrhage=True)
    zipped, loose = files[: len(files) // 2], files[len(files) // 2 :]
    archive = site.folder / "slices.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as slices:
        for path in zipped:
            slices.write(path, f"CT/{path.name}")
    stray = site.folder / "notes.txt"
    stray.write_text("not a DICOM file")
    page.set_input_files("input[name=files]", [archive, *loose, stray])
    expect(page.locator("#chosen li")).to_have_count(len(loose) + 2)
    expect(page.locator("#photo-fields")).to_be_hidden()
    page.click("#send")
    expect(page.locator("#answer")).to_contain_text(f"{len(files)} of {len(files) + 1} files accepted")
    expect(page.locator("#answer ul.files")).to_contain_text(f"slices.zip/CT/{zipped[0].name}: accepted")
    expect(page.locator("#answer ul.files .file-refused")).to_contain_text("notes.txt: refused (")
    result = result_of(page)
    assert result.get_attribute("data-study") == study_uid
    expect(result.locator("table.findings")).to_contain_text("present")
    assert len(overlays_shown(page, result)) == 2  # the node's explain_slices
    camera.shoot(page, "upload-ct-result")
    assert orthanc_instances(site, study_uid, "SR")
    assert problems == []
    page.context.close()


def test_a_worklist_patient_is_picked(browser: Browser, site: desk.Site, camera: Camera) -> None:
    """The operator picks the scheduled patient instead of typing: the form fills read-only, and the
    worklist's name, ID, accession number and Study Instance UID are what the PACS stores."""
    scheduled = write_worklist_entry(
        site.folder / "worklists",
        patient_name=desk.KOREAN_NAME,
        patient_id="WL-4711",
        patient_birth_date="1970-03-01",
        patient_sex="M",
        accession_number="ACC4711",
        study_description="Skin lesion photograph",
        scheduled=datetime.now(),
    )
    study_uid = str(pydicom.dcmread(scheduled).StudyInstanceUID)
    page = operator_page(browser, site)
    problems = desk.problems_on(page, site)
    page.goto("/upload")
    lesion = skin_phantom.render(np.random.default_rng(8), "nv")
    page.set_input_files("input[name=files]", files=[png_file("bedside.png", lesion.rgb)])
    page.select_option("select[name=task]", "skin")
    page.click("#worklist-open")
    page.fill("#worklist-name", "Hong")
    page.click("#worklist-search")
    entry = page.locator("table.worklist-entries tbody tr").filter(has_text="WL-4711")
    expect(entry).to_have_count(1)
    expect(entry.locator(".patient-name")).to_have_text("Hong Gildong = 洪 吉洞 = 홍 길동")
    camera.shoot(page, "worklist-entries")
    entry.locator("button").click()
    expect(page.locator("input[name=patient_id]")).to_have_value("WL-4711")
    expect(page.locator("input[name=patient_id]")).not_to_be_editable()
    expect(page.locator("input[name=accession_number]")).to_have_value("ACC4711")
    camera.shoot(page, "worklist-picked")
    send_confirmed(page, "#send", "Hong Gildong = 洪 吉洞 = 홍 길동, ID WL-4711")
    result = result_of(page)
    assert result.get_attribute("data-study") == study_uid

    (report,) = orthanc_instances(site, study_uid, "SR")
    assert (str(report.PatientName), report.PatientID) == (desk.KOREAN_NAME, "WL-4711")
    assert report.AccessionNumber == "ACC4711"
    assert problems == []
    page.context.close()


def camera_on(page: Page) -> None:
    """Waits for what the page waits for before it allows a capture: a camera frame on screen."""
    expect(page.locator("#take")).to_be_enabled(timeout=CAMERA_TIMEOUT_MS)


def capture(page: Page, camera: Camera, name: str) -> float:
    """On the capture page: the conjunctiva task, a typed patient, Capture, Confirm, yes; the seconds
    from Confirm to the result on screen."""
    page.goto("/capture")
    page.select_option("select[name=task]", "conjunctiva")
    camera_on(page)
    type_patient(page, "Okafor", "Adaeze", "EYE-0007")
    stream = page.locator("#video").evaluate_handle("video => video.srcObject")
    page.click("#take")
    expect(page.locator("#preview canvas")).to_be_visible()
    ended = stream.evaluate("stream => stream.getTracks().map(track => track.readyState)")
    assert ended == ["ended"], "the camera stays on after the capture"
    rows, cols = VIDEO_SIZE
    x0, y0, x1, y1 = frame_box(cols, rows)
    size = page.locator("#picture").evaluate("c => [c.width, c.height]")
    assert abs(size[0] - (x1 - x0)) <= 2 and abs(size[1] - (y1 - y0)) <= 2, "not cropped to the frame"
    assert tuple(canvas_rgba(page, "#picture")[0, 0]) == (255, 255, 255, 255), "outside the frame: white"
    camera.shoot(page, f"{name}-preview")
    page.click("#confirm")
    started = time.monotonic()
    expect(page.locator("#confirm-identity .identity")).to_contain_text("Okafor Adaeze, ID EYE-0007")
    page.click("#confirm-send")
    result_of(page)
    return time.monotonic() - started


def test_a_conjunctiva_is_captured_with_the_camera(
    driver: Playwright, site: desk.Site, camera: Camera, eye_videos: dict[str, Path]
) -> None:
    chromium = camera_browser(driver, eye_videos["eye"])
    try:
        page = operator_page(chromium, site)
        problems = desk.problems_on(page, site)
        seconds = capture(page, camera, "eye")
        result = page.locator("#answer .study-result")
        expect(result.locator("section.job h3 .status")).to_have_text("done")
        expect(result.locator(".not-analysed")).to_have_count(0)
        expect(result.locator("table.findings")).to_contain_text("Anemia")
        assert len(overlays_shown(page, result)) >= 1
        camera.shoot(page, "eye-result")
        print(f"capture → result on screen: {seconds:.1f} s")
        assert problems == []
    finally:
        chromium.close()


@pytest.mark.parametrize(
    ("video", "reason", "advice"),
    [("dark", "too dark", "better light"), ("blurred", "blurred", "Hold the camera still")],
)
def test_a_poor_capture_is_refused_with_advice(
    driver: Playwright,
    site: desk.Site,
    camera: Camera,
    eye_videos: dict[str, Path],
    video: str,
    reason: str,
    advice: str,
) -> None:
    """The quality gate's reason on the page, what to do about it, and a Retake button that works."""
    chromium = camera_browser(driver, eye_videos[video])
    try:
        page = operator_page(chromium, site)
        problems = desk.problems_on(page, site)
        seconds = capture(page, camera, video)
        result = page.locator("#answer .study-result")
        expect(result.locator(".not-analysed")).to_contain_text(f"Not analysed: {reason}")
        expect(result.locator(".retake-advice")).to_contain_text(advice)
        expect(result.locator("table.findings")).to_have_count(0)
        camera.shoot(page, f"{video}-refused")
        print(f"capture → refusal ({reason}) on screen: {seconds:.1f} s")
        result.locator(".retake-advice button").click()
        expect(page.locator("#live video")).to_be_visible()
        camera_on(page)  # on again after the retake
        expect(page.locator("#answer")).to_be_empty()
        assert problems == []
    finally:
        chromium.close()


def test_the_capture_page_on_a_phone(
    driver: Playwright, site: desk.Site, camera: Camera, eye_videos: dict[str, Path]
) -> None:
    """390 × 844 with the camera upright (a 3:4 picture): the live picture and its frame guide fit
    the screen, the guide lies exactly over the video (same box, same scaling), nothing scrolls
    sideways, and what is cropped is the drawn frame's box. Then a skin capture for a patient
    picked from the worklist on this page goes to the node under the worklist's identity."""
    scheduled = write_worklist_entry(
        site.folder / "worklists",
        patient_name="Nakamura^Yui",
        patient_id="WL-0815",
        accession_number="ACC0815",
        scheduled=datetime.now(),
    )
    chromium = camera_browser(driver, eye_videos["upright"])
    try:
        page = operator_page(chromium, site, PHONE)
        page.goto("/")  # a new page asks for /favicon.ico once, which the node has not
        problems = desk.problems_on(page, site)
        page.goto("/capture")
        page.select_option("select[name=task]", "conjunctiva")
        camera_on(page)
        rows, cols = UPRIGHT
        expect(page.locator("#guide")).to_have_js_property("width", cols)
        expect(page.locator("#guide")).to_have_js_property("height", rows)
        video, guide = page.locator("#video").bounding_box(), page.locator("#guide").bounding_box()
        assert video is not None and guide == video, "the guide is not laid over the video"
        fits = page.evaluate(
            "[...document.querySelectorAll('#video, #guide')].map(e => getComputedStyle(e).objectFit)"
        )
        assert fits == ["contain", "contain"], "the guide and the video are scaled differently"
        assert guide["x"] >= 0 and guide["x"] + guide["width"] <= PHONE["width"]
        assert guide["height"] <= 0.6 * PHONE["height"] + 1, (
            "the live picture is taller than the screen allows"
        )
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        guide_pixels = canvas_rgba(page, "#guide")
        yellow = (guide_pixels[..., 0] > 200) & (guide_pixels[..., 1] > 180) & (guide_pixels[..., 2] < 60)
        drawn = yellow & (guide_pixels[..., 3] > 200)
        assert drawn.sum() > 100, "no frame guide drawn"
        x0, y0, x1, y1 = frame_box(cols, rows)
        ys, xs = np.nonzero(drawn)  # the outline drawn, within a line's width of the box cropped
        assert abs(xs.min() - x0) <= 4 and abs(xs.max() - x1) <= 4
        assert abs(ys.min() - y0) <= 4 and abs(ys.max() - y1) <= 4
        camera.shoot(page, "phone-capture")
        page.click("#take")
        size = page.locator("#picture").evaluate("c => [c.width, c.height]")
        assert abs(size[0] - (x1 - x0)) <= 2 and abs(size[1] - (y1 - y0)) <= 2, "not cropped to the frame"
        page.click("#retake")
        camera_on(page)

        # A skin lesion's guide is a circle: what is sent is the square around it.
        page.select_option("select[name=task]", "skin")
        page.click("#take")
        side = round(2 * CaptureSettings().skin_circle_radius * min(UPRIGHT))
        assert page.locator("#picture").evaluate("c => [c.width, c.height]") == [side, side]
        page.click("#worklist-open")
        page.fill("#worklist-name", "Nakamura")
        page.press("#worklist-name", "Enter")  # searches; sends nothing
        entry = page.locator("table.worklist-entries tbody tr").filter(has_text="WL-0815")
        entry.get_by_role("button", name="Choose Nakamura Yui, ID WL-0815").click()
        expect(page.locator("input[name=patient_id]")).to_have_value("WL-0815")
        camera.shoot(page, "phone-skin-preview")
        send_confirmed(page, "#confirm", "Nakamura Yui, ID WL-0815")
        result = result_of(page)
        assert result.get_attribute("data-study") == str(pydicom.dcmread(scheduled).StudyInstanceUID)
        expect(result.locator("img.overlay")).to_be_visible()
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        camera.shoot(page, "phone-skin-result")
        study = site.node.api(f"/api/studies/{result.get_attribute('data-study')}")
        assert study["patient"] == {"id": "WL-0815", "name": "Nakamura^Yui"}
        assert problems == []
    finally:
        chromium.close()


def test_no_camera_is_said_plainly(browser: Browser, site: desk.Site, camera: Camera) -> None:
    """A browser without a camera (or refused one): the page says so and points to the upload."""
    page = operator_page(browser, site)
    page.goto("/capture")
    problem = page.locator("#camera-problem")
    expect(problem).to_be_visible()
    expect(problem).to_contain_text("camera")
    expect(page.locator("#live")).to_be_hidden()
    camera.shoot(page, "no-camera")
    page.context.close()


def test_the_camera_page_asks_for_https(driver: Playwright, site: desk.Site, camera: Camera) -> None:
    """Over plain HTTP from another host (as a phone on the ward network would reach the node), the
    browser offers no camera: the page says HTTPS is needed instead of failing silently."""
    ward = "ward-node.example"  # not localhost: Chromium treats this origin as insecure
    chromium = driver.chromium.launch(
        executable_path=desk.CHROMIUM, headless=True, args=[f"--host-resolver-rules=MAP {ward} 127.0.0.1"]
    )
    try:
        node = copy.copy(site.node)
        node.url = site.node.url.replace("127.0.0.1", ward)
        page = operator_page(chromium, desk.Site(node, site.orthanc, site.folder))
        page.goto("/capture")
        assert page.evaluate("window.isSecureContext") is False
        problem = page.locator("#camera-problem")
        expect(problem).to_contain_text("HTTPS")
        expect(page.locator("#live")).to_be_hidden()
        camera.shoot(page, "insecure-context")
    finally:
        chromium.close()
