"""The dashboard as people use it: Debian's Chromium, headless and driven by Playwright, against a real
node process that real studies go through on their way to a real Orthanc. Every page visited is saved
as a screenshot under ``test-artifacts/screenshots/`` for a reviewer to look at."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Request, expect, sync_playwright

from node.web.auth import SESSION_COOKIE
from tests import test_end_to_end as end_to_end
from tests.peers import REPO, NodeProcess, OrthancServer, free_port, storescu, wait_for
from training.ct_phantom import head_ct_series

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium")
SCREENSHOTS = REPO / "test-artifacts" / "screenshots"
# One user per role, and one whose account the lockout test locks.
USERS = {"alice": "admin", "oscar": "operator", "victor": "viewer", "mallory": "viewer"}
LOCKOUT_AFTER = 3
# The Korean example name of PS3.5 H.3, in ISO 2022 IR 149 as Korean sites send it.
KOREAN_NAME = "Hong^Gildong=洪^吉洞=홍^길동"


def password(name: str) -> str:
    return f"{name}-correct-horse-battery"


@dataclass
class Site:
    """The node under test, its PACS, and where its studies come from."""

    node: NodeProcess
    orthanc: OrthancServer
    folder: Path


class Camera:
    """Numbered screenshots in the order the pages were visited, so a reviewer can follow the story."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0

    def shoot(self, page: Page, name: str) -> Path:
        self.count += 1
        path = self.folder / f"{self.count:02d}-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        return path


def node_settings(node_port: int, pacs_port: int) -> dict[str, Any]:
    """The end-to-end node (head CTs to the head-CT model, results to the test's Orthanc), with
    plain-HTTP cookies, a lockout the tests reach, and a chest route that takes none of these studies
    (the Routes page's tester says why)."""
    settings = end_to_end.node_settings(node_port, pacs_port)
    settings["node"].update(allowed_calling_aets=["STORESCU"], torch_threads=1)
    settings["web"] = {"secure_cookies": False, "lockout_after": LOCKOUT_AFTER, "lockout_seconds": 600}
    settings["routes"][0]["options"]["explain_slices"] = 2
    settings["routes"].append(
        {
            "name": "chest-xray",
            "match": {"Modality": ["CR", "DX"], "BodyPartExamined": "CHEST"},
            "handler": "chest_xray",
            "model": "chest-xray",
            "destinations": ["pacs"],
        }
    )
    return settings


def add_user(node: NodeProcess, name: str, role: str) -> None:
    """``ainode users add`` against the node's configuration, as an administrator does."""
    run = subprocess.run(
        [sys.executable, "-m", "node.cli", "users", "add", name, "--role", role, "--password-stdin"]
        + ["--config", str(node.config)],
        input=password(name) + "\n",
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr


def write_study(folder: Path, seed: int, hemorrhage: bool) -> tuple[str, list[Path]]:
    """A small head CT under the Korean name; its StudyInstanceUID and files."""
    paths = []
    for number, ds in enumerate(head_ct_series(10, hemorrhage=hemorrhage, seed=seed, size=256), start=1):
        ds.SpecificCharacterSet = ["", "ISO 2022 IR 149"]
        ds.PatientName = KOREAN_NAME
        path = folder / f"study-{seed}" / f"CT{number:04d}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID), paths


@pytest.fixture(scope="module")
def camera() -> Camera:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for old in SCREENSHOTS.glob("[0-9]*.png"):  # its own; the capture tests keep theirs
        old.unlink()
    return Camera(SCREENSHOTS)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    folder = tmp_path_factory.mktemp("browser")
    node_port = free_port()
    orthanc = OrthancServer(folder / "orthanc").start()
    node = NodeProcess(folder / "node", node_settings(node_port, orthanc.dicom_port)).start()
    try:
        for name, role in USERS.items():
            add_user(node, name, role)
        yield Site(node, orthanc, folder)
    finally:
        node.stop()
        orthanc.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if CHROMIUM is None:
        pytest.skip("no chromium on the PATH: bash deploy/install.sh --test installs Debian's")
    with sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield chromium
        chromium.close()


def new_page(browser: Browser, site: Site) -> Page:
    """A page in a browser context of its own: no cookies, as a new visitor; wide enough for the
    dashboard's tables, so that screenshots show whole rows."""
    return browser.new_context(base_url=site.node.url, viewport={"width": 1440, "height": 900}).new_page()


def log_in(browser: Browser, site: Site, name: str, camera: Camera | None = None) -> Page:
    """A fresh browser context (no cookies) in which ``name`` logs in through the login form."""
    page = new_page(browser, site)
    page.goto("/")
    page.wait_for_url(re.compile(r"/login\?next=/$"))
    page.fill("input[name=name]", name)
    page.fill("input[name=password]", password(name))
    if camera is not None:
        camera.shoot(page, "login")
    page.click("form[action='/login'] button[type=submit]")
    page.wait_for_url(lambda url: "/login" not in url)
    expect(page.locator("header .user")).to_contain_text(f"{name} {USERS[name]}")
    return page


def problems_on(page: Page, site: Site) -> list[str]:
    """What goes wrong in ``page`` from now on that a person may not notice: script errors, anything
    refused by the node's Content Security Policy or failing to load, anything fetched from elsewhere
    (the node serves every script, style and font itself)."""
    problems: list[str] = []

    def console(message: ConsoleMessage) -> None:
        if message.type == "error":
            problems.append(message.text)

    def request(sent: Request) -> None:
        if not sent.url.startswith(site.node.url):
            problems.append(f"fetched from outside the node: {sent.url}")

    page.on("console", console)
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("request", request)
    return problems


def send(site: Site, files: list[Path]) -> None:
    run = storescu(site.node.dicom_port, files)
    assert run.returncode == 0, run.stderr


def job(site: Site, study_uid: str) -> dict[str, Any]:
    """The study's one job as the API (the harness's admin token) sees it."""
    detail = site.node.study(study_uid)
    assert detail is not None
    jobs = [j for series in detail["series"] for j in series["jobs"]]
    assert len(jobs) == 1, jobs
    return dict(jobs[0])


def sent_size(site: Site, png_path: str) -> list[int]:
    """Columns and rows of the Secondary Capture that an overlay's PNG is rendered from, as the PACS
    stored it (the PNG's path ends in the SOP Instance UID)."""
    sop_uid = png_path.rsplit("/", 1)[-1].removesuffix(".png")
    (found,) = httpx.post(f"{site.orthanc.url}/tools/lookup", content=sop_uid, timeout=10).json()
    ds = pydicom.dcmread(BytesIO(site.orthanc.file(found["ID"])), stop_before_pixels=True)
    return [int(ds.Columns), int(ds.Rows)]


def watch(page: Page, path: str, done: Callable[[], bool], timeout: float, what: str) -> None:
    """Reload ``path`` until ``done`` holds, as a person keeps pressing F5."""

    def reloaded() -> bool:
        page.goto(path)
        return done()

    wait_for(reloaded, timeout, what, interval=0.5)


def test_an_admin_watches_a_study_through_the_node(browser: Browser, site: Site, camera: Camera) -> None:
    """Log in; a study arrives and is processed while the admin watches; its page explains it, shows
    its overlay; a re-run gives a second run; the audit log has both runs and who looked."""
    page = log_in(browser, site, "alice", camera)
    problems = problems_on(page, site)
    expect(page.locator("main > h1")).to_have_text("Overview")
    camera.shoot(page, "overview-before")
    page.click("nav >> text=Studies")
    expect(page.locator("main > h1")).to_have_text("Studies")

    study_uid, files = write_study(site.folder, seed=101, hemorrhage=True)
    row = page.locator(f"table.studies tr:has(a[href='/studies/{study_uid}'])")
    with ThreadPoolExecutor(1) as pool:
        sending = pool.submit(send, site, files)
        watch(page, "/studies", lambda: row.count() == 1, 60, "the study on the Studies page")
        camera.shoot(page, "studies-arriving")
        sending.result()
    watch(
        page,
        "/studies",
        lambda: row.locator(".status").inner_text() == "done",
        180,
        "the study done on the Studies page",
    )
    camera.shoot(page, "studies-done")
    expect(row.locator(".patient-name")).to_contain_text("홍 길동")
    expect(row).to_contain_text("head-ct")

    page.click("nav >> text=Overview")
    expect(page.locator("table.models")).to_contain_text("ct-hemorrhage")
    camera.shoot(page, "overview-after")

    page.goto("/studies")
    row.locator(".patient-name a").click()
    page.wait_for_url(f"**/studies/{study_uid}")
    expect(page.locator("h1 .patient-name")).to_contain_text("홍 길동")
    first = page.locator("section.job")
    expect(first).to_have_count(1)
    expect(first.locator("h3 .status")).to_have_text("done")
    expect(first).to_contain_text("ct-hemorrhage")
    expect(first.locator("table.findings")).to_contain_text("present")
    report = page.locator(".result-sr details.report")
    report.locator("summary").click()  # the SR's content, as a table
    expect(report.locator("table.measurement-group")).to_contain_text("Intracranial hemorrhage")
    expect(report).to_contain_text("NOT FOR DIAGNOSTIC USE")
    overlays = page.locator("img.overlay")
    expect(overlays).to_have_count(2)  # explain_slices
    for index in range(overlays.count()):
        overlay = overlays.nth(index)
        overlay.scroll_into_view_if_needed()
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=overlay.element_handle())
        shown = overlay.evaluate("img => [img.naturalWidth, img.naturalHeight]")
        assert shown == sent_size(site, overlay.get_attribute("src") or ""), "not the SC the PACS got"
    camera.shoot(page, "study")
    first_finished = job(site, study_uid)["finished_at"]

    page.click("form[action$='/rerun'] button")
    expect(page.locator("main")).to_contain_text("re-run queued")
    camera.shoot(page, "study-rerun-queued")
    watch(
        page,
        f"/studies/{study_uid}",
        lambda: page.locator("section.job h3 .status").inner_text() == "done",
        180,
        "the re-run done",
    )
    rerun = job(site, study_uid)
    assert rerun["attempts"] == 2 and rerun["finished_at"] > first_finished
    expect(page.locator("section.job tr:has(th:text-is('Attempts')) td")).to_have_text("2")
    camera.shoot(page, "study-rerun-done")

    page.click("nav >> text=Audit")
    page.fill("input[name=study_uid]", study_uid)
    page.click("form.filters button[type=submit]")
    events = page.locator("table.audit tbody tr")
    expect(events.filter(has_text="job.finished")).to_have_count(2)
    expect(events.filter(has_text="job.rerun").filter(has_text="user:alice")).to_have_count(1)
    expect(events.filter(has_text="phi.viewed").filter(has_text="user:alice").first).to_be_visible()
    expect(page.locator(".chain")).to_contain_text("Chain verified")
    camera.shoot(page, "audit-study")
    assert problems == []
    page.context.close()


@pytest.fixture(scope="module")
def finished_study(site: Site) -> str:
    """A second study, sent and processed without anyone watching: what the role tests act on."""
    study_uid, files = write_study(site.folder, seed=202, hemorrhage=False)
    send(site, files)
    wait_for(lambda: (s := site.node.study(study_uid)) and s["status"] == "done", 180, "the study done")
    return study_uid


def test_an_operator_tours_the_configuration_pages(browser: Browser, site: Site, camera: Camera) -> None:
    """Models, Routes (with its tester) and Destinations (with a C-ECHO to the real PACS) all render,
    with every script and style the node's own and accepted by its Content Security Policy."""
    page = log_in(browser, site, "oscar")
    problems = problems_on(page, site)
    page.click("nav >> text=Models")
    expect(page.locator("main > h1")).to_have_text("Models")
    expect(page.locator("main")).to_contain_text("ct-hemorrhage")
    expect(page.locator("main")).to_contain_text("NOT FOR DIAGNOSTIC USE")
    camera.shoot(page, "models")

    page.click("nav >> text=Routes")
    _, files = write_study(site.folder, seed=303, hemorrhage=False)
    page.set_input_files("form.tester input[name=files]", str(files[0]))
    page.click("form.tester button[type=submit]")
    verdict = page.locator("article.verdict")
    expect(verdict.locator("h4")).to_contain_text("takes head-ct")
    expect(verdict.locator("ul.refused")).to_contain_text("chest-xray")
    expect(verdict.locator("ul.refused")).to_contain_text("Modality")
    camera.shoot(page, "routes-tester")

    page.click("nav >> text=Destinations")
    page.click("tr#destination-pacs button:text-is('C-ECHO')")
    expect(page.get_by_role("status")).to_contain_text("success")
    camera.shoot(page, "destinations-echo")
    assert problems == []
    page.context.close()


def test_a_viewer_cannot_rerun(browser: Browser, site: Site, camera: Camera, finished_study: str) -> None:
    page = log_in(browser, site, "victor")
    problems = problems_on(page, site)
    page.goto(f"/studies/{finished_study}")
    expect(page.locator("section.job h3 .status")).to_have_text("done")
    expect(page.locator("form[action$='/rerun']")).to_have_count(0)
    expect(page.get_by_role("button", name="Re-run")).to_have_count(0)
    camera.shoot(page, "study-as-viewer")
    attempts = job(site, finished_study)["attempts"]

    # The request the button would send, with the viewer's own valid session and CSRF token.
    token = page.locator("input[name=csrf_token]").first.get_attribute("value")
    assert token
    refused = page.request.post(f"/studies/{finished_study}/rerun", form={"csrf_token": token})
    assert refused.status == 403, refused.text()
    assert "viewer" in refused.text()
    assert job(site, finished_study)["attempts"] == attempts and job(site, finished_study)["status"] == "done"
    assert problems == []
    page.context.close()


def test_a_forged_csrf_token_is_refused(
    browser: Browser, site: Site, camera: Camera, finished_study: str
) -> None:
    page = log_in(browser, site, "oscar")
    page.goto(f"/studies/{finished_study}")
    attempts = job(site, finished_study)["attempts"]
    page.locator("form[action$='/rerun'] input[name=csrf_token]").evaluate("input => input.value = 'forged'")
    with page.expect_response(lambda r: r.request.method == "POST") as posted:
        page.click("form[action$='/rerun'] button")
    assert posted.value.status == 403
    expect(page.locator("body")).to_contain_text("CSRF")
    camera.shoot(page, "forged-csrf-refused")
    assert job(site, finished_study)["attempts"] == attempts

    # The same button with the page's own token: the operator may re-run.
    page.goto(f"/studies/{finished_study}")
    page.click("form[action$='/rerun'] button")
    expect(page.locator("main")).to_contain_text("re-run queued")
    wait_for(lambda: job(site, finished_study)["attempts"] == attempts + 1, 180, "the operator's re-run")
    page.context.close()


def test_the_api_refuses_requests_without_credentials(browser: Browser, site: Site, camera: Camera) -> None:
    page = new_page(browser, site)
    for path in ("/api/studies", "/metrics"):
        assert page.request.get(path).status == 401, path
    health = page.request.get("/healthz")
    assert health.status == 200 and "Hong" not in health.text()
    assert (response := page.goto("/api/studies")) is not None and response.status == 401
    camera.shoot(page, "api-without-credentials")
    page.goto("/studies")
    page.wait_for_url(re.compile(r"/login\?next=/studies$"))
    page.context.close()

    page = log_in(browser, site, "victor")
    listed = page.request.get("/api/studies")
    assert listed.status == 200 and len(listed.json()) >= 1
    page.context.close()


def test_failed_logins_lock_the_account(browser: Browser, site: Site, camera: Camera) -> None:
    page = new_page(browser, site)
    page.goto("/login")

    def attempt(secret: str) -> int:
        page.fill("input[name=name]", "mallory")
        page.fill("input[name=password]", secret)
        with page.expect_response(lambda r: r.request.method == "POST") as answer:
            page.click("form[action='/login'] button[type=submit]")
        expect(page.get_by_role("alert")).to_contain_text("Wrong name or password")
        return answer.value.status

    assert [attempt("a wrong guess") for _ in range(LOCKOUT_AFTER)] == [401] * LOCKOUT_AFTER
    # Locked now: the right password is refused too, and the login page says no more than before.
    assert attempt(password("mallory")) == 401
    assert all(cookie["name"] != SESSION_COOKIE for cookie in page.context.cookies())
    camera.shoot(page, "login-locked")
    page.context.close()

    admin = log_in(browser, site, "alice")
    admin.goto("/audit?actor=user:mallory&action=user.login")
    events = admin.locator("table.audit tbody tr")
    expect(events.filter(has_text="reason=wrong password")).to_have_count(LOCKOUT_AFTER)
    expect(events.filter(has_text="locked_seconds=600")).to_have_count(1)  # the last wrong guess locks
    expect(events.filter(has_text="reason=locked")).to_have_count(1)  # the right password, refused
    camera.shoot(admin, "audit-lockout")

    # The admin sees the lock on the Users page, and lifts it by setting a new password.
    admin.click("nav >> text=Users")
    account = admin.locator("tr:has(td:text-is('mallory'))")
    expect(account).to_contain_text(f"{LOCKOUT_AFTER} failed logins, locked until")
    camera.shoot(admin, "users-locked")
    account.locator("input[name=password]").fill(password("mallory") + "-new")
    account.locator("button:text-is('Set password')").click()
    expect(account).to_contain_text("active")
    admin.context.close()
    page = new_page(browser, site)
    page.goto("/login")
    page.fill("input[name=name]", "mallory")
    page.fill("input[name=password]", password("mallory") + "-new")
    page.click("form[action='/login'] button[type=submit]")
    expect(page.locator("header .user")).to_contain_text("mallory viewer")
    page.context.close()
