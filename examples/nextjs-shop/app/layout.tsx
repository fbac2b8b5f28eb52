import type { ReactNode } from "react";
import "./globals.css";

export const metadata = { title: "Shop — notify-engine example" };

export default function RootLayout({ children }: { children: ReactNode }) {
  return (
    <html lang="en">
      <body>{children}</body>
    </html>
  );
}
