"""The telecom user's 30 phone tools, plus the functions tasks use to break and check the phone.

The phone is a small simulation: most writes re-run a network search that
derives signal, technology and service status from the SIM, the network
mode preference, airplane mode, the APN and whether the line is active.
As in tau2, connecting a VPN installs the toolkit's *default* VPN details
object itself, so ``break_vpn`` (which degrades the connected VPN) also
degrades the default for every later connection in the same environment.
"""

from __future__ import annotations

from typing import Any

from matrix_hpc.workflows.tau2.domains.telecom.user_models import (
    APNNames,
    APNSettings,
    AppPermissions,
    AppStatus,
    MockPhoneAttributes,
    NetworkModePreference,
    NetworkStatus,
    NetworkTechnology,
    PerformanceLevel,
    SignalStrength,
    SimStatus,
    TelecomUserDB,
    UserSurroundings,
    VpnDetails,
)
from matrix_hpc.workflows.tau2.tools import ToolKit, tool

SIGNAL_ICONS = {
    SignalStrength.NONE: "📵 No Signal",
    SignalStrength.POOR: "📶¹ Poor",
    SignalStrength.FAIR: "📶² Fair",
    SignalStrength.GOOD: "📶³ Good",
    SignalStrength.EXCELLENT: "📶⁴ Excellent",
}
SIM_MESSAGES = {
    SimStatus.ACTIVE: "Your SIM card is active and working.",
    SimStatus.MISSING: "No SIM card detected in the phone.",
    SimStatus.LOCKED_PIN: "The SIM card is locked with a PIN code.",
    SimStatus.LOCKED_PUK: "The SIM card is locked with a PUK code.",
}
SPEED_RANGE_MBPS = {
    NetworkTechnology.TWO_G: (0.1, 0.4),
    NetworkTechnology.THREE_G: (1.0, 5.0),
    NetworkTechnology.FOUR_G: (10.0, 100.0),
    NetworkTechnology.FIVE_G: (50.0, 500.0),
    NetworkTechnology.NONE: (0.0, 0.0),
}
SIGNAL_FACTOR = {
    SignalStrength.POOR: 0.2,
    SignalStrength.FAIR: 0.5,
    SignalStrength.GOOD: 0.8,
    SignalStrength.EXCELLENT: 1.0,
    SignalStrength.NONE: 0.0,
}
SPEED_ADVICE = {
    "Very Poor": "Connection is very slow. Basic web browsing might be difficult.",
    "Poor": "Connection is slow. Web browsing may be sluggish, streaming difficult.",
    "Fair": "Connection is okay for web browsing and some standard definition streaming.",
    "Good": "Connection is good for most activities, including HD streaming.",
    "Excellent": "Connection is very fast.",
}
# The technology a network mode connects to (4G/5G preferred falls back to 4G without 5G signal).
MODE_TECHNOLOGY = {
    NetworkModePreference.FOUR_G_ONLY: NetworkTechnology.FOUR_G,
    NetworkModePreference.THREE_G_ONLY: NetworkTechnology.THREE_G,
    NetworkModePreference.TWO_G_ONLY: NetworkTechnology.TWO_G,
}


def _on_off(flag: Any) -> str:
    return "ON" if flag else "OFF"


def _yes_no(flag: Any) -> str:
    return "Yes" if flag else "No"


class TelecomUserTools(ToolKit):  # the class name shows in argument errors, as tau2's does
    db: TelecomUserDB

    # Functions a task's initialisation actions or assertions may call besides the tools.
    ENV_FUNCTIONS = (
        "set_user_info",
        "set_user_location",
        "turn_airplane_mode_on",
        "turn_airplane_mode_off",
        "unseat_sim_card",
        "lock_sim_card",
        "turn_data_on",
        "turn_data_off",
        "turn_roaming_on",
        "turn_roaming_off",
        "turn_data_saver_mode_on",
        "turn_data_saver_mode_off",
        "break_apn_settings",
        "break_apn_mms_setting",
        "set_wifi_calling",
        "break_vpn",
        "remove_app_permission",
        "simulate_network_search",
        "assert_airplane_mode_status",
        "assert_service_status",
        "assert_mobile_data_status",
        "assert_mobile_roaming_status",
        "assert_mobile_data_saver_mode_status",
        "assert_internet_speed",
        "assert_internet_not_excellent",
        "assert_can_send_mms",
        "assert_mobile_data_usage_exceeded",
    )

    def __init__(self, db: TelecomUserDB) -> None:
        super().__init__(db)
        self.default_vpn_details = VpnDetails(
            server_address="192.168.1.1", protocol="OpenVPN", server_performance=PerformanceLevel.EXCELLENT
        )

    @property
    def device(self) -> MockPhoneAttributes:
        return self.db.device

    @property
    def surroundings(self) -> UserSurroundings:
        return self.db.surroundings

    # --- derived state

    def _status_bar(self) -> str:
        device = self.device
        parts: list[str] = []
        if device.airplane_mode:
            parts.append("✈️ Airplane Mode")
        else:
            parts.append(SIGNAL_ICONS.get(device.network_signal_strength, "📵 No Signal"))
            has_network = device.network_technology_connected != NetworkTechnology.NONE
            if has_network:
                parts.append(device.network_technology_connected.value)
            if device.data_enabled and has_network:
                parts.append("📱 Data Enabled")
                if device.data_saver_mode:
                    parts.append("🔽 Data Saver")
            else:
                parts.append("📵 Data Disabled")
        if device.wifi_enabled and device.wifi_connected:
            parts.append(f"📡 Connected to {device.wifi_ssid}" if device.wifi_ssid else "📡 Enabled")
        if device.vpn_connected:
            parts.append("🔒 VPN Connected")
        parts.append(f"🔋 {device.battery_level}%")
        return " | ".join(parts)

    def _with_status_bar(self, message: str) -> str:
        return f"{message}\nStatus Bar: {self._status_bar()}"

    def _sim_status(self) -> SimStatus:
        return SimStatus.MISSING if self.device.sim_card_missing else self.device.sim_card_status

    def _mobile_data_working(self) -> bool:
        device, around = self.device, self.surroundings
        if device.airplane_mode or device.network_signal_strength == SignalStrength.NONE:
            return False
        if device.network_connection_status == NetworkStatus.NO_SERVICE:
            return False
        if around.is_abroad and (not device.roaming_enabled or not around.roaming_allowed):
            return False
        return bool(device.data_enabled) and not around.mobile_data_usage_exceeded

    def _speed(self) -> tuple[float | None, str | None]:
        if not self._mobile_data_working():
            return None, "No Connection"
        device = self.device
        vpn_slow = (
            device.vpn_connected
            and device.vpn_details
            and device.vpn_details.server_performance == PerformanceLevel.POOR
        )
        factor = 0.1 if vpn_slow else 1.0
        if device.data_saver_mode:
            factor *= 0.2
        low, high = SPEED_RANGE_MBPS.get(device.network_technology_connected, (0.0, 0.0))
        signal = SIGNAL_FACTOR.get(device.network_signal_strength, 0.0)
        speed = round((low + high) / 2.0 * signal * factor, 2)
        if speed < 1:
            return speed, "Very Poor"
        if speed < 5:
            return speed, "Poor"
        if speed < 25:
            return speed, "Fair"
        if speed < 100:
            return speed, "Good"
        return speed, "Excellent"

    def _mms_works(self) -> bool:
        device = self.device
        if not self._mobile_data_working():
            return False
        if device.network_technology_connected == NetworkTechnology.TWO_G:
            return False
        if device.wifi_calling_enabled and device.wifi_calling_mms_over_wifi:
            return False  # the carrier does not support MMS over Wi-Fi
        if device.active_apn_settings.mmsc_url is None:
            return False
        messaging = device.app_statuses.get("messaging")
        if messaging is None:
            return False
        return messaging.permissions.storage and messaging.permissions.sms

    def _no_service(self) -> None:
        self.device.network_connection_status = NetworkStatus.NO_SERVICE
        self.device.network_technology_connected = NetworkTechnology.NONE
        self.device.network_signal_strength = SignalStrength.NONE

    def simulate_network_search(self) -> None:
        """Re-derive the cellular connection from SIM, mode, airplane mode, APN and line."""
        device, signals = self.device, self.surroundings.signal_strength
        if self._sim_status() == SimStatus.ACTIVE:
            device.network_connection_status = NetworkStatus.CONNECTED
            mode = device.network_mode_preference
            five_g = signals.get(NetworkTechnology.FIVE_G, SignalStrength.NONE)
            if mode == NetworkModePreference.FOUR_G_5G_PREFERRED and five_g != SignalStrength.NONE:
                technology = NetworkTechnology.FIVE_G
            else:
                technology = MODE_TECHNOLOGY.get(mode, NetworkTechnology.FOUR_G)
            device.network_technology_connected = technology
            device.network_signal_strength = signals.get(technology, SignalStrength.NONE)
        else:
            self._no_service()
        if device.airplane_mode:
            self._no_service()
        if device.active_apn_settings.apn_name == APNNames.BROKEN:
            self._no_service()
        if not self.surroundings.line_active:
            self._no_service()

    # --- state changes shared by tools and setup functions

    def _flip_airplane_mode(self) -> bool:
        device = self.device
        was_on = device.airplane_mode
        device.airplane_mode = not was_on
        if was_on:
            device.network_connection_status = NetworkStatus.SEARCHING
            if device.wifi_enabled:
                self._drop_wifi()
        else:
            self._drop_wifi()
            if device.vpn_connected:
                self._vpn_off()
        self.simulate_network_search()
        return device.airplane_mode

    def _drop_wifi(self) -> None:
        self.device.wifi_connected = False
        self.device.wifi_ssid = None
        self.device.wifi_signal_strength = SignalStrength.NONE

    def _flip_data(self) -> bool:
        self.device.data_enabled = not self.device.data_enabled
        self.simulate_network_search()
        return self.device.data_enabled

    def _flip_roaming(self) -> bool:
        self.device.roaming_enabled = not self.device.roaming_enabled
        self.simulate_network_search()
        return self.device.roaming_enabled

    def _flip_data_saver(self) -> bool:
        self.device.data_saver_mode = not self.device.data_saver_mode
        return self.device.data_saver_mode

    def _flip_wifi_calling(self) -> bool:
        self.device.wifi_calling_enabled = not self.device.wifi_calling_enabled
        return self.device.wifi_calling_enabled

    def _vpn_on(self) -> bool | None:
        if self.device.vpn_connected:
            return None
        self.device.vpn_connected = True
        self.device.vpn_details = self.default_vpn_details  # the object itself, as tau2 does
        return True

    def _vpn_off(self) -> bool:
        if not self.device.vpn_connected:
            return False
        self.device.vpn_connected = False
        self.device.vpn_details = None
        return True

    @staticmethod
    def _granted(permissions: AppPermissions) -> list[str]:
        return [name.replace("_", " ").lower() for name, allowed in permissions.model_dump().items() if allowed]

    # --- tools, in tau2's order

    @tool(mutates=False)
    def check_status_bar(self) -> str:
        return f"Status Bar: {self._status_bar()}"

    @tool(mutates=False)
    def check_network_status(self) -> str:
        device = self.device
        lines = [
            f"Airplane Mode: {_on_off(device.airplane_mode)}",
            f"SIM Card Status: {self._sim_status().value}",
            f"Cellular Connection: {device.network_connection_status.value}",
            f"Cellular Signal: {device.network_signal_strength.value}",
            f"Cellular Network Type: {device.network_technology_connected.value}",
            f"Mobile Data Enabled: {_yes_no(device.data_enabled)}",
            f"Data Roaming Enabled: {_yes_no(device.roaming_enabled)}",
            f"Wi-Fi Radio: {_on_off(device.wifi_enabled)}",
            f"Wi-Fi Connected: {_yes_no(device.wifi_connected)}",
        ]
        if device.wifi_connected:
            lines.append(f"Connected Wi-Fi Network: {device.wifi_ssid}")
        return "\n".join(lines)

    @tool(mutates=False)
    def check_network_mode_preference(self) -> str:
        return f"Network Mode Preference: {self.device.network_mode_preference.value}"

    @tool(mutates=True)
    def set_network_mode_preference(self, mode: Any) -> str:
        try:
            if isinstance(mode, str):
                mode = NetworkModePreference(mode)
            self.device.network_mode_preference = mode
            self.simulate_network_search()
            chosen = mode
        except ValueError:
            chosen = None
        if chosen is None:
            options = ", ".join(m.value for m in NetworkModePreference)
            return self._with_status_bar(
                f"Failed to set network mode: '{mode}' is not a valid option. Please use one of: {options}"
            )
        return self._with_status_bar(f"Preferred Network Mode set to: {chosen.value}")

    @tool(mutates=False)
    def run_speed_test(self) -> str:
        speed, description = self._speed()
        if speed is None:
            return f"Speed test failed: {description or 'Could not determine speed'}."
        advice = SPEED_ADVICE.get(description or "", "")
        return f"Speed Test Result: {speed:.2f} Mbps ({description}). {advice}"

    @tool(mutates=True)
    def toggle_airplane_mode(self) -> str:
        return self._with_status_bar(f"Airplane Mode is now {_on_off(self._flip_airplane_mode())}.")

    @tool(mutates=False)
    def check_sim_status(self) -> str:
        status = self._sim_status()
        return SIM_MESSAGES.get(status, f"Unknown SIM status: {status.value}")

    @tool(mutates=True)
    def reseat_sim_card(self) -> str:
        self.device.sim_card_missing = False
        self.simulate_network_search()
        return self._with_status_bar("SIM card re-seated successfully.")

    @tool(mutates=True)
    def toggle_data(self) -> str:
        return self._with_status_bar(f"Mobile Data is now {_on_off(self._flip_data())}.")

    @tool(mutates=True)
    def toggle_roaming(self) -> str:
        return self._with_status_bar(f"Data Roaming is now {_on_off(self._flip_roaming())}.")

    @tool(mutates=False)
    def check_data_restriction_status(self) -> str:
        if self.device.data_saver_mode:
            return "Data Saver mode is ON (limits data usage)."
        return "Data Saver mode is OFF."

    @tool(mutates=True)
    def toggle_data_saver_mode(self) -> str:
        return self._with_status_bar(f"Data Saver Mode is now {_on_off(self._flip_data_saver())}.")

    @tool(mutates=False)
    def check_apn_settings(self) -> str:
        settings = self.device.active_apn_settings
        apn_name = settings.apn_name.value or "Not Set"
        mmsc_url = settings.mmsc_url or "Not Set"
        return (
            f"Current APN Name: {apn_name}\nMMSC URL (for picture messages): {mmsc_url}\n"
            "(These are technical settings, usually best left unchanged.)"
        )

    @tool(mutates=True)
    def set_apn_settings(self, apn_settings: Any) -> str:
        if isinstance(apn_settings, dict):
            apn_settings = APNSettings(**apn_settings)
        self.device.active_apn_settings = apn_settings
        message = f"APN settings set to: {apn_settings.apn_name.value}"
        self.simulate_network_search()
        return self._with_status_bar(message)

    @tool(mutates=True)
    def reset_apn_settings(self) -> str:
        self.device.active_apn_settings.reset_at_reboot = True
        self.simulate_network_search()
        return self._with_status_bar("APN settings will reset at reboot.")

    @tool(mutates=False)
    def check_wifi_status(self) -> str:
        device = self.device
        if not device.wifi_enabled:
            return "Wi-Fi is turned OFF."
        if device.wifi_connected:
            return (
                f"Wi-Fi is ON and connected to '{device.wifi_ssid}'. "
                f"Signal strength: {device.wifi_signal_strength.value}."
            )
        return "Wi-Fi is ON but not connected to any network."

    @tool(mutates=True)
    def toggle_wifi(self) -> str:
        if self.device.airplane_mode:
            return self._with_status_bar("Cannot change Wi-Fi settings while Airplane Mode is ON.")
        enabled = not self.device.wifi_enabled
        self.device.wifi_enabled = enabled
        if not enabled:
            self._drop_wifi()
        return self._with_status_bar(f"Wi-Fi is now {_on_off(enabled)}.")

    @tool(mutates=False)
    def check_wifi_calling_status(self) -> str:
        return f"Wi-Fi Calling is currently turned {_on_off(self.device.wifi_calling_enabled)}."

    @tool(mutates=True)
    def toggle_wifi_calling(self) -> str:
        return self._with_status_bar(f"Wi-Fi Calling is now {_on_off(self._flip_wifi_calling())}.")

    @tool(mutates=False)
    def check_vpn_status(self) -> str:
        device = self.device
        if device.vpn_connected:
            details = device.vpn_details.model_dump() if device.vpn_details else None
            if details:
                return f"VPN is ON and connected. Details: {details}"
            return "VPN is ON and connected (no specific details available)."
        if device.vpn_enabled_setting:
            return "VPN is turned ON in settings, but currently not connected."
        return "VPN is turned OFF."

    @tool(mutates=True)
    def connect_vpn(self) -> str:
        connected = self._vpn_on()
        if connected is None:
            return "VPN already connected."
        return self._with_status_bar("VPN connected successfully." if connected else "No VPN connection to connect.")

    @tool(mutates=True)
    def disconnect_vpn(self) -> str:
        message = "VPN disconnected successfully." if self._vpn_off() else "No active VPN connection to disconnect."
        return self._with_status_bar(message)

    @tool(mutates=False)
    def check_installed_apps(self) -> str:
        return f"The following apps are installed on the phone: {', '.join(self.device.app_statuses.keys())}"

    @tool(mutates=False)
    def check_app_status(self, app_name: str) -> str:
        app = self.device.app_statuses.get(app_name)
        if not app:
            return f"App '{app_name}' not found on this phone."
        lines = [f"Status for App: {app_name}"]
        granted = self._granted(app.permissions)
        if not granted:
            lines.append(" - Permissions: None granted.")
        else:
            lines.append(" - Permissions Granted:")
            lines += [f"   - {name}" for name in granted]
        return "\n".join(lines)

    @tool(mutates=False)
    def check_app_permissions(self, app_name: str) -> str:
        app = self.device.app_statuses.get(app_name)
        if not app:
            return f"App '{app_name}' not found on this phone."
        granted = self._granted(app.permissions)
        if not granted:
            return f"App '{app_name}' currently has no permissions granted."
        return f"App '{app_name}' has permission for: {', '.join(granted)}."

    @tool(mutates=True)
    def grant_app_permission(self, app_name: str, permission: str) -> str:
        app = self.device.app_statuses.get(app_name)
        permission = permission.lower()
        if not app:
            outcome = f"Error. App '{app_name}' not found. Cannot grant permission."
        else:
            tracked = list(app.permissions.model_dump().keys())
            if permission not in tracked:
                outcome = (
                    f"Error. Permission '{permission}' not tracked for app '{app_name}', "
                    f"available permissions: {tracked}"
                )
            else:
                setattr(app.permissions, permission, True)
                outcome = f"Success. Permission '{permission}' granted to app '{app_name}'."
        return self._with_status_bar(outcome)

    @tool(mutates=False)
    def can_send_mms(self) -> str:
        if self._mms_works():
            return "Your messaging app can send MMS messages."
        return "Your messaging app cannot send MMS messages."

    @tool(mutates=True)
    def reboot_device(self) -> str:
        lines = []
        if self.device.active_apn_settings.reset_at_reboot:
            lines.append("Resetting APN settings...")
            self.device.active_apn_settings = APNSettings()
        lines.append("Restarting network services...")
        self.device.network_connection_status = NetworkStatus.SEARCHING
        self.simulate_network_search()
        return self._with_status_bar("\n".join(lines))

    @tool(mutates=False)
    def check_payment_request(self) -> str:
        request = self.surroundings.payment_request
        if request is None:
            return "No payment request has been made."
        return f"You have a payment request for bill {request.bill_id} of {request.amount_due} USD."

    @tool(mutates=True)
    def make_payment(self) -> str:
        request = self.surroundings.payment_request
        if request is None:
            return "You do not have a payment request."
        request.paid = True
        return f"Payment of {request.amount_due} USD has been made for bill {request.bill_id}."

    # --- setup functions (initialisation actions)

    def set_user_info(self, name: str, phone_number: str) -> None:
        self.surroundings.name = name
        self.surroundings.phone_number = phone_number

    def set_user_location(self, abroad: bool) -> None:
        self.surroundings.is_abroad = abroad

    def turn_airplane_mode_on(self) -> str:
        if not self._flip_airplane_mode():
            self._flip_airplane_mode()
        return "Airplane Mode is now ON."

    def turn_airplane_mode_off(self) -> str:
        if self._flip_airplane_mode():
            self._flip_airplane_mode()
        return "Airplane Mode is now OFF."

    def unseat_sim_card(self) -> str:
        self.device.sim_card_missing = True
        self.simulate_network_search()
        return "SIM card un-seated successfully."

    def lock_sim_card(self, mode: str) -> str:
        if mode == "pin":
            self.device.sim_card_status = SimStatus.LOCKED_PIN
        elif mode == "puk":
            self.device.sim_card_status = SimStatus.LOCKED_PUK
        self.simulate_network_search()
        return f"SIM card locked successfully in {mode} mode."

    def turn_data_on(self) -> str:
        self.device.data_enabled = True  # no network search, as in tau2
        return "Data connection restored."

    def turn_data_off(self) -> str:
        if self._flip_data():
            self._flip_data()
        return "Data connection broken."

    def turn_roaming_on(self) -> str:
        if not self._flip_roaming():
            self._flip_roaming()
        return "Data Roaming is now ON."

    def turn_roaming_off(self) -> str:
        if self._flip_roaming():
            self._flip_roaming()
        return "Data Roaming is now OFF."

    def turn_data_saver_mode_on(self) -> str:
        if not self._flip_data_saver():
            self._flip_data_saver()
        return "Data Saver Mode is now ON."

    def turn_data_saver_mode_off(self) -> str:
        if self._flip_data_saver():
            self._flip_data_saver()
        return "Data Saver Mode is now OFF."

    def break_apn_settings(self) -> str:
        self.device.active_apn_settings.apn_name = APNNames.BROKEN
        self.simulate_network_search()
        return "APN settings broken. Please call reset_apn_settings() to fix."

    def break_apn_mms_setting(self) -> str:
        self.device.active_apn_settings.mmsc_url = None
        return "APN MMS setting broken. Please call reset_apn_settings() to fix."

    def set_wifi_calling(self, enabled: bool, mms_over_wifi: bool | None = None) -> str:
        if self.device.wifi_calling_enabled != enabled:
            self._flip_wifi_calling()
        message = f"Wi-Fi Calling is now {_on_off(enabled)}."
        if mms_over_wifi is not None:
            self.device.wifi_calling_mms_over_wifi = mms_over_wifi
            message += f"\nMMS over Wi-Fi is now {_on_off(mms_over_wifi)}."
        return message

    def break_vpn(self) -> str:
        self.connect_vpn()
        self.device.vpn_details.server_performance = PerformanceLevel.POOR  # type: ignore[union-attr]
        return "VPN connection broken."

    def remove_app_permission(self, app_name: str, permission: str) -> tuple[bool, str]:
        app: AppStatus | None = self.device.app_statuses.get(app_name)
        permission = permission.lower()
        if not app:
            return False, f"App '{app_name}' not found. Cannot remove permission."
        if not hasattr(app.permissions, permission):
            return False, f"Permission '{permission}' not tracked for app '{app_name}'."
        setattr(app.permissions, permission, False)
        return True, f"Permission '{permission}' removed from app '{app_name}'."

    # --- assertions (env_assertions of the tasks)

    def assert_airplane_mode_status(self, expected_status: bool) -> bool:
        return self.device.airplane_mode == expected_status

    def assert_service_status(self, expected_status: str) -> bool:
        return self.device.network_connection_status == NetworkStatus(expected_status)

    def assert_mobile_data_status(self, expected_status: bool) -> bool:
        return self._mobile_data_working() == expected_status

    def assert_mobile_roaming_status(self, expected_status: bool) -> bool:
        return self.device.roaming_enabled == expected_status

    def assert_mobile_data_saver_mode_status(self, expected_status: bool) -> bool:
        return self.device.data_saver_mode == expected_status

    def assert_internet_speed(self, expected_speed: float, expected_desc: str | None = None) -> bool:
        speed, description = self._speed()
        speed = speed or 0.0
        if expected_desc is None:
            return speed >= expected_speed
        return speed >= expected_speed and (description or "").lower() == expected_desc.lower()

    def assert_internet_not_excellent(self) -> bool:
        _, description = self._speed()
        return (description or "").lower() != "excellent"

    def assert_can_send_mms(self, expected_status: bool) -> bool:
        return self._mms_works() == expected_status

    def assert_mobile_data_usage_exceeded(self, expected_status: bool) -> bool:
        return self.surroundings.mobile_data_usage_exceeded == expected_status
