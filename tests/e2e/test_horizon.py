"""FT flavors through Horizon, in a real browser, against the lab.

One lab for the class, as in test_cloud.py, with Horizon
(``cloudlab.py horizon``: Horizon under uwsgi in the control namespace,
at ``http://<lab>/dashboard/``). Headless Chromium (Debian's
``chromium`` and ``chromium-driver``), driven by Selenium, does what an
admin does (doc/admin.rst)::

    log in as admin
    Admin > Compute > Flavors > the flavor's "Update Metadata"
    "Fault Tolerance (mftvm-openstack)" > "Fault tolerant" > +, Save
    openstack flavor show FLAVOR      -> ft:enabled='true'

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
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import testtools
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

from tests.e2e.test_cloud import (
    CLOUDLAB,
    PIP,
    PYTHON,
    ROOT,
    VENV_BIN,
    _checked,
    _run,
)

CHROMIUM = '/usr/bin/chromium'
CHROMEDRIVER = '/usr/bin/chromedriver'
ARTIFACTS = os.path.join(
    os.environ.get('MFTVM_E2E_ARTIFACTS',
                   os.path.join(ROOT, 'build', 'e2e-artifacts')), 'horizon')
NAMESPACE = 'MFTVM::FaultTolerance'
NAMESPACE_TITLE = 'Fault Tolerance (mftvm-openstack)'
#: how long a page or the dialog may take (two busy cores)
PAGE_TIMEOUT = 120
#: the server's build on the lab's one FT host
BUILD_TIMEOUT = 300


class HorizonCloudTest(testtools.TestCase):

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        if os.geteuid() != 0:
            raise RuntimeError('the e2e tier needs root (network namespaces)')
        for path in (PYTHON, CHROMIUM, CHROMEDRIVER):
            if not os.path.exists(path):
                raise RuntimeError(f'no {path}: run tools/run.sh test, '
                                   f'which installs it')
        cls.tmp = tempfile.mkdtemp(prefix='mftvm-e2e-horizon-')
        cls.lab_dir = os.path.join(cls.tmp, 'lab')
        try:
            cls._install_wheel()
            with open(os.path.join(cls.tmp, 'up.log'), 'w') as out:
                result = subprocess.run(
                    [PYTHON, CLOUDLAB, 'up', '--dir', cls.lab_dir,
                     '--name', f'hp{os.getpid()}'],
                    stdout=out, stderr=subprocess.STDOUT, timeout=900)
            if result.returncode:
                with open(os.path.join(cls.tmp, 'up.log')) as f:
                    raise RuntimeError(f'cloudlab up failed:\n'
                                       f'{f.read()[-6000:]}')
            cls.dashboard = _checked(
                [PYTHON, CLOUDLAB, 'horizon', '--dir', cls.lab_dir],
                timeout=900).stdout.strip().splitlines()[-1]
            cls.admin_env = cls._openrc()
            cls.hosts: list[str] = []
            cls.browser = cls._browser()
        except BaseException:
            cls._tear_down()
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        cls._tear_down()
        super().tearDownClass()

    @classmethod
    def _tear_down(cls) -> None:
        browser = getattr(cls, 'browser', None)
        if browser is not None:
            browser.quit()      # ends chromedriver and its Chromium
        if os.path.exists(os.path.join(cls.lab_dir, 'lab.json')):
            _run([PYTHON, CLOUDLAB, 'down', '--dir', cls.lab_dir])
        shutil.rmtree(cls.tmp, ignore_errors=True)

    @classmethod
    def _install_wheel(cls) -> None:
        out = os.path.join(cls.tmp, 'wheel')
        _checked([*PIP, 'wheel', '--no-deps', '--no-build-isolation',
                  '-w', out, ROOT], cwd=cls.tmp)
        (wheel,) = [os.path.join(out, name) for name in os.listdir(out)]
        _checked([*PIP, 'install', '--no-deps', '--force-reinstall', wheel])

    @classmethod
    def _openrc(cls) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith('OS_')}
        env['PATH'] = f'{VENV_BIN}:{env.get("PATH", os.defpath)}'
        with open(os.path.join(cls.lab_dir, 'openrc')) as f:
            for line in f:
                key, _, value = line.removeprefix('export ').strip(
                    ).partition('=')
                if key.startswith('OS_'):
                    env[key] = value
        return env

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

    # -- the lab, through the CLI ------------------------------------------

    def cli(self, *args: str, check: bool = True
            ) -> subprocess.CompletedProcess:
        """``openstack ARGS`` as the lab's admin."""
        result = _run([os.path.join(VENV_BIN, 'openstack'), *args],
                      env=self.admin_env, cwd=self.tmp)
        if check and result.returncode:
            self.fail(f'openstack {" ".join(args)} exited '
                      f'{result.returncode}:\n{result.stderr[-3000:]}')
        return result

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, '-f', 'json').stdout)

    def flavor(self, name: str) -> str:
        flavor = self.cli_json('flavor', 'create', '--ram', '128', '--disk',
                               '1', '--vcpus', '1', name)
        self.addCleanup(self.cli, 'flavor', 'delete', name, check=False)
        return flavor['id']

    def add_host(self, host: str) -> None:
        """A compute host with the FT driver, once for the class."""
        if host not in self.hosts:
            _checked([PYTHON, CLOUDLAB, 'add-host', host, '--dir',
                      self.lab_dir], timeout=900)
            self.hosts.append(host)

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
        self.visible('#id_password').send_keys(
            self.admin_env['OS_PASSWORD'])
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
        return self.cli_json('flavor', 'show', flavor)['properties']

    # -- the tests ---------------------------------------------------------

    def test_glance_holds_the_ft_metadefs(self):
        with open(os.path.join(ROOT, 'etc', 'metadefs',
                               'mftvm-ft.json')) as f:
            document = json.load(f)
        shown = self.cli_json('image', 'metadef', 'namespace', 'show',
                              NAMESPACE)
        self.assertEqual(NAMESPACE_TITLE, shown['display_name'])
        self.assertEqual(['OS::Nova::Flavor'],
                         shown['resource_type_associations'])
        self.assertEqual(
            {'enabled': 'boolean', 'epoch_ms': 'integer',
             'disk_sync': 'string'},
            {p['name']: p['type'] for p in self.cli_json(
                'image', 'metadef', 'property', 'list', NAMESPACE)})
        # as Horizon asks for a flavor's dialog: for the resource type,
        # which names each property with its prefix
        token = self.cli('token', 'issue', '-f', 'value', '-c',
                         'id').stdout.strip()
        glance = self.cli_json('endpoint', 'list', '--service', 'image',
                               '--interface', 'public')[0]['URL']
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
        self.flavor('m1.ft-horizon')
        self.assertEqual({}, self.properties('m1.ft-horizon'))
        self.turn_ft_on('m1.ft-horizon')
        self.assertEqual({'ft:enabled': 'true'},
                         self.properties('m1.ft-horizon'))

    def test_a_mistyped_key_from_horizon_errors_the_server(self):
        flavor = self.flavor('m1.ft-typo')
        self.log_in()
        dialog = self.open_update_metadata('m1.ft-typo')
        custom = self.visible('input[name=customItem]', dialog)
        custom.send_keys('ft:enable')
        custom.find_element(By.XPATH, './following-sibling::span/button'
                            ).click()
        value = self.existing(dialog, 'ft:enable').find_element(
            By.CSS_SELECTOR, 'input[type=text]')
        value.send_keys('true')
        self.shot('custom-key')
        self.save('m1.ft-typo')
        # stored as typed: Horizon's microversion is not checked
        self.assertEqual({'ft:enable': 'true'}, self.properties('m1.ft-typo'))

        self.add_host('h1')
        image = os.path.join(self.tmp, 'tiny.raw')
        with open(image, 'wb') as f:
            f.truncate(1 << 20)
        self.cli('image', 'create', '--disk-format', 'raw',
                 '--container-format', 'bare', '--file', image,
                 'horizon-tiny')
        self.addCleanup(self.cli, 'image', 'delete', 'horizon-tiny',
                        check=False)
        server = self.cli_json('server', 'create', '--image', 'horizon-tiny',
                               '--flavor', flavor, '--nic', 'none',
                               'typo-vm')['id']
        self.addCleanup(self.cli, 'server', 'delete', '--wait', server,
                        check=False)
        deadline = time.monotonic() + BUILD_TIMEOUT
        while True:
            shown = self.cli_json('server', 'show', server)
            if shown['status'] in ('ERROR', 'ACTIVE'):
                break
            if time.monotonic() > deadline:
                self.fail(f'server still {shown["status"]} after '
                          f'{BUILD_TIMEOUT}s')
            time.sleep(3)
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
