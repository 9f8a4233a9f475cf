"""FT flavors through Horizon, in a real browser, against the lab.

On the tier's shared lab (:mod:`tests.e2e.lab`), with Horizon started
in it by the first test here (``cloudlab.py horizon``: Horizon under
uwsgi in the control namespace, at ``http://<lab>/dashboard/``).
Headless Chromium (Debian's ``chromium`` and ``chromium-driver``),
driven by Selenium, does what an admin does (doc/admin.rst)::

    log in as admin
    Admin > Compute > Flavors > the flavor's "Update Metadata"
    "Fault Tolerance (mftvm-openstack)" > "Fault tolerant" > +, Save
    openstack flavor show FLAVOR      -> ft:enabled='true'
    a server of that flavor           -> protected; its overview in
                                         Horizon says ft_status protected

Horizon saves extra specs below microversion 2.86, so nova-api does not
check them: a mistyped key typed into the dialog's Custom field is
stored, and the FT driver refuses the build (ERROR, the fault naming the
key) instead of running the server unprotected.

Every step leaves a screenshot in ``build/e2e-artifacts/horizon/``
(``$MFTVM_E2E_ARTIFACTS/horizon`` if set); each test names the
directory in its ``screenshots`` detail.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from selenium import webdriver
from selenium.common.exceptions import (
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait
from testtools import content

from tests.e2e import lab
from tests.e2e.lab import HOSTS, ROOT, VALIDATED
from tests.e2e.test_reporting import FT_FLAVOR_SPECS

CHROMIUM = '/usr/bin/chromium'
CHROMEDRIVER = '/usr/bin/chromedriver'
ARTIFACTS = os.path.join(
    os.environ.get('MFTVM_E2E_ARTIFACTS',
                   os.path.join(ROOT, 'build', 'e2e-artifacts')), 'horizon')
NAMESPACE = 'MFTVM::FaultTolerance'
NAMESPACE_TITLE = 'Fault Tolerance (mftvm-openstack)'
#: how long a page or the dialog may take (two busy cores)
PAGE_TIMEOUT = 120
#: the server's build on the lab's FT hosts
BUILD_TIMEOUT = 300
#: the build of an FT server: primary's guest, secondary chosen, first
#: checkpoint and initial disk copy (the agent's protect_timeout is 300)
PROTECT_TIMEOUT = 420


class HorizonCloudTest(lab.LabTestCase):

    #: the lab's Horizon, and the class's browser
    dashboard: str
    browser: webdriver.Chrome

    @classmethod
    def setUpClass(cls) -> None:
        for path in (CHROMIUM, CHROMEDRIVER):
            if not os.path.exists(path):
                raise RuntimeError(f'no {path}: run tools/run.sh test, '
                                   f'which installs it')
        super().setUpClass()
        cls.dashboard = cls.lab.horizon()
        cls.browser = cls._browser()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.browser.quit()      # ends chromedriver and its Chromium
        super().tearDownClass()

    @classmethod
    def _browser(cls) -> webdriver.Chrome:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        # root has no sandbox; /dev/shm may be small; a fixed window
        # gives the same screenshots every run
        for arg in ('--headless=new', '--no-sandbox',
                    '--disable-dev-shm-usage', '--disable-gpu',
                    '--window-size=1280,860'):
            options.add_argument(arg)
        browser = webdriver.Chrome(service=Service(CHROMEDRIVER),
                                   options=options)
        browser.set_page_load_timeout(PAGE_TIMEOUT)
        return browser

    # -- the browser -------------------------------------------------------

    def setUp(self) -> None:
        super().setUp()
        self.shots = os.path.join(ARTIFACTS, self.id().rsplit('.', 1)[-1])
        shutil.rmtree(self.shots, ignore_errors=True)
        os.makedirs(self.shots)
        self.addDetail('screenshots', content.text_content(self.shots))
        self.step = 0

    def shot(self, what: str) -> None:
        """Screenshot of the window, numbered in the order taken."""
        self.step += 1
        self.browser.save_screenshot(
            os.path.join(self.shots, f'{self.step:02d}-{what}.png'))

    def until(self, what: str, found: Callable[[Any], Any],
              timeout: float = PAGE_TIMEOUT) -> Any:
        try:
            # Angular redraws the dialog's lists under our feet
            return WebDriverWait(
                self.browser, timeout,
                ignored_exceptions=(NoSuchElementException,
                                    StaleElementReferenceException),
            ).until(found)
        except TimeoutException:
            self.shot(f'timeout-{what.replace(" ", "-")}')
            self.fail(f'no {what} after {timeout}s at '
                      f'{self.browser.current_url} (screenshots in '
                      f'{self.shots})')

    def visible(self, css: str, within: Any = None) -> WebElement:
        root = within or self.browser
        return self.until(css, lambda _: next(
            (e for e in root.find_elements(By.CSS_SELECTOR, css)
             if e.is_displayed()), None))

    def log_in(self) -> None:
        self.browser.delete_all_cookies()
        self.browser.get(self.dashboard + 'auth/login/')
        self.visible('#id_username').send_keys('admin')
        self.visible('#id_password').send_keys(self.env['OS_PASSWORD'])
        self.shot('login')
        self.visible('#loginBtn').click()
        self.until('the dashboard after logging in', lambda b: (
            '/auth/login' not in b.current_url
            and b.find_elements(By.CSS_SELECTOR, '.user-menu')))
        self.shot('logged-in')

    def open_update_metadata(self, flavor: str) -> WebElement:
        """Admin > Compute > Flavors, the row's "Update Metadata":
        the dialog, once it lists the FT namespace."""
        self.browser.get(self.dashboard + 'admin/flavors/')
        row = self.visible(f'tr[data-display="{flavor}"]')
        self.shot('flavors')
        # the row's first action, or in its menu when Horizon puts
        # another first
        action = row.find_element(By.CSS_SELECTOR,
                                  'a[id$="__action_update_metadata"]')
        if not action.is_displayed():
            row.find_element(By.CSS_SELECTOR, '.dropdown-toggle').click()
        self.visible('a[id$="__action_update_metadata"]', row).click()
        dialog = self.visible('.modal-dialog .metadata-tree')
        self.until(f'"{NAMESPACE_TITLE}" in the dialog',
                   lambda _: self.available(dialog, NAMESPACE_TITLE))
        self.shot('update-metadata')
        return dialog

    @staticmethod
    def available(dialog: WebElement, label: str) -> WebElement | None:
        """The dialog's "Available Metadata" entry labelled ``label``."""
        for item in dialog.find_elements(
                By.CSS_SELECTOR, '.col-md-6:first-child li.list-group-item'):
            if item.is_displayed() and item.text.strip() == label:
                return item
        return None

    def existing(self, dialog: WebElement, key: str) -> WebElement:
        """The dialog's "Existing Metadata" entry of ``key``."""
        return self.until(f'{key} under Existing Metadata', lambda _: next(
            (item for item in dialog.find_elements(
                By.CSS_SELECTOR, '.metadata-tree-item')
             if item.is_displayed() and item.find_element(
                 By.CSS_SELECTOR, '.input-group-addon').text == key),
            None))

    def save(self, flavor: str) -> None:
        """The dialog's Save; it closes once Nova has the specs."""
        self.visible('.modal-footer .btn-primary').click()
        self.until('the dialog to close', lambda b: not any(
            e.is_displayed() for e in b.find_elements(
                By.CSS_SELECTOR, '.modal-dialog .metadata-tree')))
        self.browser.get(self.dashboard + 'admin/flavors/')
        self.visible(f'tr[data-display="{flavor}"]')
        self.shot('saved')

    def properties(self, flavor: str) -> dict[str, str]:
        return self.openstack_json(  # type: ignore[no-any-return]
            'flavor', 'show', flavor)['properties']

    def wait_built(self, server: str, timeout: float = BUILD_TIMEOUT
                   ) -> dict:
        """``server show`` once the server is ACTIVE or ERROR."""
        deadline = time.monotonic() + timeout
        while True:
            shown = self.openstack_json('server', 'show', server)
            if shown['status'] in ('ERROR', 'ACTIVE'):
                return shown  # type: ignore[no-any-return]
            if time.monotonic() > deadline:
                self.fail(f'server still {shown["status"]} after '
                          f'{timeout}s')
            time.sleep(3)

    # -- the tests ---------------------------------------------------------

    def test_glance_holds_the_ft_metadefs(self):
        with open(os.path.join(ROOT, 'etc', 'metadefs',
                               'mftvm-ft.json')) as f:
            document = json.load(f)
        shown = self.openstack_json('image', 'metadef', 'namespace',
                                    'show', NAMESPACE)
        self.assertEqual(NAMESPACE_TITLE, shown['display_name'])
        self.assertEqual(['OS::Nova::Flavor'],
                         shown['resource_type_associations'])
        self.assertEqual(
            {'enabled': 'boolean', 'epoch_ms': 'integer',
             'disk_sync': 'string'},
            {p['name']: p['type'] for p in self.openstack_json(
                'image', 'metadef', 'property', 'list', NAMESPACE)})
        # as Horizon asks for a flavor's dialog: for the resource type,
        # which names each property with its prefix
        token = self.openstack('token', 'issue', '-f', 'value', '-c',
                               'id').stdout.strip()
        glance = self.openstack_json('endpoint', 'list', '--service',
                                     'image', '--interface',
                                     'public')[0]['URL']
        request = urllib.request.Request(
            f'{glance}/v2/metadefs/namespaces/{NAMESPACE}'
            f'?resource_type=OS::Nova::Flavor',
            headers={'X-Auth-Token': token})
        with urllib.request.urlopen(request, timeout=60) as response:
            properties = json.load(response)['properties']
        self.assertEqual({f'ft:{name}' for name in document['properties']},
                         set(properties))
        self.assertEqual(
            (20, 10000), (properties['ft:epoch_ms']['minimum'],
                          properties['ft:epoch_ms']['maximum']))
        self.assertEqual(
            ['async-replication', 'block-copy', 'write-replication'],
            properties['ft:disk_sync']['enum'])

    def turn_ft_on(self, flavor: str) -> None:
        """doc/admin.rst's "In Horizon" steps: ``ft:enabled`` on, from
        the FT namespace in the flavor's "Update Metadata" dialog."""
        self.log_in()
        dialog = self.open_update_metadata(flavor)
        # the namespace opens to its properties, titled from the
        # validators' own descriptions
        self.available(dialog, NAMESPACE_TITLE).click()
        enabled = self.until('"Fault tolerant" under Available Metadata',
                             lambda _: self.available(dialog,
                                                      'Fault tolerant'))
        for title in ('Epoch length (ms)', 'Disk synchronisation'):
            self.assertIsNotNone(self.available(dialog, title), title)
        enabled.click()
        self.assertIn('continuously checkpointed',
                      dialog.find_element(By.CSS_SELECTOR, '.well').text)
        self.shot('fault-tolerant-described')
        enabled.find_element(By.CSS_SELECTOR, '.pull-right .btn').click()
        checkbox = self.existing(dialog, 'ft:enabled').find_element(
            By.CSS_SELECTOR, 'input[type=checkbox]')
        if not checkbox.is_selected():      # the namespace's default: on
            checkbox.click()
        self.assertTrue(checkbox.is_selected())
        self.shot('ft-enabled-added')
        self.save(flavor)

    def test_admin_turns_ft_on_in_the_update_metadata_dialog(self):
        flavor = self.unique('m1.ft-horizon')
        self.assertEqual({}, self.flavor(flavor))
        self.turn_ft_on(flavor)
        self.assertEqual({'ft:enabled': 'true'}, self.properties(flavor))

    def test_a_server_of_the_horizon_flavor_is_protected(self):
        flavor = self.unique('m1.ft-protected')
        self.flavor(flavor)
        self.turn_ft_on(flavor)
        # steered to FT hosts, as doc/admin.rst has it (CLI, validated)
        self.openstack('flavor', 'set', '--property',
                       'trait:CUSTOM_MFTVM_FT=required', flavor,
                       microversion=VALIDATED)
        self.assertEqual(dict(p.split('=') for p in FT_FLAVOR_SPECS),
                         self.properties(flavor))
        self.add_hosts(*HOSTS)
        self.only_hosts(*HOSTS)
        name = self.unique('e2e-horizon')
        _, _, image, _ = self.upload_guest(
            name, 'os_command_line=console=ttyS0 mftvm.run=counter')
        port = self.guest_port(name)
        server = self.server(name, '--image', image['id'], '--flavor',
                             flavor, '--nic', f'port-id={port["id"]}',
                             wait=False)['id']
        deadline = time.monotonic() + PROTECT_TIMEOUT
        while True:
            shown = self.openstack_json('server', 'show', server)
            status = shown['properties'].get('ft_status', '')
            if shown['status'] == 'ERROR' or status == 'protected' or \
                    status.startswith(('error', 'unprotected')):
                break
            if time.monotonic() > deadline:
                self.fail(f'server {shown["status"]}, ft_status '
                          f'{status!r} after {PROTECT_TIMEOUT}s')
            time.sleep(5)
        self.assertEqual(('ACTIVE', 'protected'), (shown['status'], status),
                         shown.get('fault'))
        # the admin sees it in Horizon: the server's overview lists its
        # metadata, where Nova keeps ft_status
        self.browser.get(self.dashboard + f'admin/instances/{server}/detail')
        shown_status = self.until('ft_status on the instance page', lambda b:
                                  b.find_element(By.XPATH, (
                                      "//dt[normalize-space()='ft_status']"
                                      "/following-sibling::dd[1]")))
        self.assertEqual('protected', shown_status.text.strip())
        # (the Metadata section is below the fold)
        self.browser.execute_script(
            'arguments[0].scrollIntoView({block: "center"})', shown_status)
        self.shot('server-protected')

    def test_a_mistyped_key_from_horizon_errors_the_server(self):
        flavor = self.unique('m1.ft-typo')
        self.flavor(flavor)
        self.log_in()
        dialog = self.open_update_metadata(flavor)
        custom = self.visible('input[name=customItem]', dialog)
        custom.send_keys('ft:enable')
        custom.find_element(By.XPATH, './following-sibling::span/button'
                            ).click()
        value = self.existing(dialog, 'ft:enable').find_element(
            By.CSS_SELECTOR, 'input[type=text]')
        value.send_keys('true')
        self.shot('custom-key')
        self.save(flavor)
        # stored as typed: Horizon's microversion is not checked
        self.assertEqual({'ft:enable': 'true'}, self.properties(flavor))

        self.add_hosts(*HOSTS)
        self.only_hosts(*HOSTS)
        image = os.path.join(self.tmp, 'tiny.raw')
        with open(image, 'wb') as f:
            f.truncate(1 << 20)
        tiny = self.openstack_json(
            'image', 'create', '--disk-format', 'raw', '--container-format',
            'bare', '--file', image, self.unique('horizon-tiny'))
        self.addCleanup(self.openstack, 'image', 'delete', tiny['id'],
                        check=False)
        server = self.server(self.unique('typo-vm'), '--image', tiny['id'],
                             '--flavor', flavor, '--nic', 'none',
                             wait=False)['id']
        shown = self.wait_built(server)
        self.assertEqual('ERROR', shown['status'])
        message = shown['fault']['message']
        self.assertIn("flavor extra spec 'ft:enable': is not a known extra "
                      "spec", message)
        self.assertIn('aborted', message)
        # the admin sees why in Horizon too
        self.browser.get(self.dashboard + f'admin/instances/{server}/detail')
        self.until('the fault on the instance page', lambda b: "'ft:enable'"
                   in b.find_element(By.TAG_NAME, 'body').text)
        self.shot('server-fault')
