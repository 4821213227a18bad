#!/usr/bin/env python3
"""The chat page at `/` of `edgefusion serve`, in headless Chromium (Selenium + chromedriver).

Run by scripts/test-serve-clients.sh against a running server:

    python scripts/chat-page-test.py --base http://127.0.0.1:PORT --api-key KEY

Checks: the page loads and, once given the API key, shows the served model; a message
streams a reply (the text grows while the request runs, then the status line shows tokens
and tok/s); Stop cancels a long reply mid-stream, the page says so, and the server frees
the slot (`edgefusion_requests_cancelled_total` goes up, `edgefusion_active_slots` back to
0). Exits non-zero with the failed check's message.
"""

import argparse
import sys
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys


def fail(message):
    sys.exit(f"chat-page-test: FAILED: {message}")


def wait_for(what, condition, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    fail(f"timed out waiting for {what}")


def metric(base, key, name):
    request = urllib.request.Request(base + "/metrics", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return int(line.split()[1])
    fail(f"{name} missing from /metrics")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--api-key", required=True)
    ap.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    args = ap.parse_args()

    options = webdriver.ChromeOptions()
    for flag in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(args.chromedriver), options=options)
    try:
        driver.get(args.base + "/")
        if driver.title != "EdgeFusion chat":
            fail(f"page title {driver.title!r}")
        # Without the key the page names the refusal; with it, the model.
        model = driver.find_element(By.ID, "model")
        wait_for("the model line", lambda: model.text != "…", 30)
        key = driver.find_element(By.ID, "api-key")
        key.send_keys(args.api_key)
        key.send_keys(Keys.TAB)  # change event
        wait_for("the model name", lambda: model.text and not model.text.startswith("("), 30)
        print(f"page shows model {model.text!r}")

        # Greedy, so the replies below are the same on every run.
        driver.find_element(By.ID, "temperature").clear()
        driver.find_element(By.ID, "temperature").send_keys("0")
        # A short reply streams in and finishes with the speed shown.
        driver.find_element(By.ID, "max-tokens").clear()
        driver.find_element(By.ID, "max-tokens").send_keys("24")
        box = driver.find_element(By.ID, "input")
        box.send_keys("What is the capital of France?")
        box.send_keys(Keys.ENTER)
        replies = lambda: driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")
        wait_for("a reply bubble", lambda: len(replies()) == 1, 30)
        reply = replies()[0]
        wait_for("the reply to finish", lambda: reply.get_attribute("data-state") != "streaming")
        if reply.get_attribute("data-state") != "done" or not reply.text.strip():
            fail(f"reply state {reply.get_attribute('data-state')!r}, text {reply.text!r}")
        status = driver.find_element(By.ID, "status").text
        if "tok/s" not in status or "tokens" not in status:
            fail(f"status line {status!r}")
        print(f"reply {reply.text[:60]!r}; status {status!r}")

        # A long reply: text grows while streaming, then Stop cancels it.
        cancelled = metric(args.base, args.api_key, "edgefusion_requests_cancelled_total")
        driver.find_element(By.ID, "max-tokens").clear()
        driver.find_element(By.ID, "max-tokens").send_keys("900")
        box.send_keys("Write a very long story about a lighthouse keeper.")
        box.send_keys(Keys.ENTER)
        wait_for("a second reply bubble", lambda: len(replies()) == 2, 30)
        reply = replies()[1]
        first = wait_for("streamed text", lambda: reply.text.strip(), 60)
        wait_for("more streamed text", lambda: len(reply.text) > len(first) + 10, 60)
        if reply.get_attribute("data-state") != "streaming":
            fail("the long reply ended before Stop was pressed")
        if metric(args.base, args.api_key, "edgefusion_active_slots") != 1:
            fail("the long reply is not generating on the server before Stop")
        driver.find_element(By.ID, "stop").click()
        wait_for("the stopped state", lambda: reply.get_attribute("data-state") == "stopped", 10)
        if "stopped" not in driver.find_element(By.ID, "status").text:
            fail(f"status after stop: {driver.find_element(By.ID, 'status').text!r}")
        wait_for("the cancellation on the server",
                 lambda: metric(args.base, args.api_key, "edgefusion_requests_cancelled_total") > cancelled, 10)
        wait_for("the slot freed",
                 lambda: metric(args.base, args.api_key, "edgefusion_active_slots") == 0, 10)
        if not driver.find_element(By.ID, "send").is_enabled():
            fail("Send stays disabled after Stop")
        print(f"stopped after {len(reply.text)} characters; the server freed the slot")
        print("chat-page-test: all checks passed")
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
