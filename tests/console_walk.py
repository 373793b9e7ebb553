"""The console walk-through a browser test drives (``tests/test_console_selenium.py`` on the engine-less app,
``tests/test_console_browser.py`` on the real server): log in, register a target from the form, watch it become
active, open its report once its verification has finished, delete it; screenshots along the way."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tests.browser import wait_for

REPORT_WINDOW = (1280, 2300)


def shoot(driver: Any, directory: Path | None, name: str) -> None:
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(directory / f"console-{name}.png"))


def log_in(driver: Any, base_url: str, key: str, shots: Path | None) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{base_url}/admin/ui/targets")
    assert driver.current_url.endswith("/admin/ui/login")
    driver.find_element(By.ID, "key").send_keys(key)
    shoot(driver, shots, "login")
    driver.find_element(By.ID, "login").click()
    wait_for(lambda: driver.current_url.endswith("/admin/ui/targets"), 10, "no targets page after login")
    assert "lethe_console" not in driver.execute_script("return document.cookie")  # HttpOnly: no script reads it


def register(driver: Any, base_url: str, name: str, aliases: Sequence[str], items: Sequence[tuple[str, str]],
             mechanisms: Sequence[str], request: dict[str, str], shots: Path | None) -> str:
    """Fill the register form and submit it; the new target's id."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver.get(f"{base_url}/admin/ui/targets/new")
    driver.find_element(By.ID, "name").send_keys(name)
    driver.find_element(By.ID, "aliases").send_keys("\n".join(aliases))
    forget = "\n".join(f"{q.replace('|', '/')} | {a.replace('|', '/')}" for q, a in items)
    driver.execute_script("arguments[0].value = arguments[1];", driver.find_element(By.ID, "forget"), forget)
    for box in driver.find_elements(By.CSS_SELECTOR, "input[type=checkbox][name^=mechanism_]"):
        if box.is_selected() != (box.get_attribute("name").removeprefix("mechanism_") in mechanisms):
            box.click()
    for field, value in request.items():
        element = driver.find_element(By.ID, field)
        if field == "legal_basis":
            Select(element).select_by_value(value)
        elif element.get_attribute("type") == "date":  # typed as the browser's date widget takes it
            driver.execute_script("arguments[0].value = arguments[1];", element, value)
        else:
            element.send_keys(value)
    shoot(driver, shots, "register")
    driver.find_element(By.ID, "submit-register").click()
    wait_for(lambda: "/admin/ui/targets/tgt_" in driver.current_url, 30, "no target page after registering")
    return driver.current_url.split("/admin/ui/targets/")[1].split("?")[0]


def watch_until_active(driver: Any, base_url: str, target_id: str, timeout_s: float, shots: Path | None,
                       between: Callable[[], Any] = lambda: None) -> None:
    """The target's page refreshes itself while its jobs run: wait until it says ``active``."""
    from selenium.webdriver.common.by import By

    driver.get(f"{base_url}/admin/ui/targets")
    shoot(driver, shots, "targets-preparing")
    driver.get(f"{base_url}/admin/ui/targets/{target_id}")

    def active() -> bool:
        between()
        return driver.find_element(By.ID, "target-status").text == "active"

    wait_for(active, timeout_s, "the target did not become active", poll_s=1.0)
    shoot(driver, shots, "target")
    driver.get(f"{base_url}/admin/ui/targets")
    shoot(driver, shots, "targets")


def open_report(driver: Any, base_url: str, target_id: str, timeout_s: float, shots: Path | None,
                between: Callable[[], Any] = lambda: None, rerun: bool = False) -> dict[str, str]:
    """The report page once its verification has finished (it refreshes itself while one runs); its figures. With
    ``rerun``, its "Re-run verification" button is pressed first."""
    from selenium.webdriver.common.by import By

    driver.get(f"{base_url}/admin/ui/targets/{target_id}/report")
    if rerun:
        driver.find_element(By.ID, "rerun-verification").click()
        wait_for(lambda: "verification-queued" in driver.current_url, 30, "no report page after re-running")

    def figures() -> dict[str, str] | None:
        between()
        found = driver.find_elements(By.ID, "leak-before")
        if not found or driver.find_elements(By.ID, "verification-running"):
            return None
        return {name: driver.find_element(By.ID, name).text
                for name in ("leak-before", "leak-after", "detection", "false-positives")}

    shown = wait_for(figures, timeout_s, "the report shows no finished verification", poll_s=2.0)
    driver.set_window_size(*REPORT_WINDOW)
    shoot(driver, shots, "report")
    return shown


def delete(driver: Any, base_url: str, target_id: str, shots: Path | None) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{base_url}/admin/ui/targets/{target_id}/delete")
    driver.find_element(By.ID, "confirm-delete").click()
    wait_for(lambda: "/admin/ui/tombstones" in driver.current_url, 30, "no tombstones page after deleting")
    assert target_id in driver.find_element(By.ID, "tombstones").text
    shoot(driver, shots, "tombstones")
    driver.get(f"{base_url}/admin/ui/actions?target_id={target_id}")
    assert "target.delete" in driver.find_element(By.ID, "trail").text
    shoot(driver, shots, "trail")
